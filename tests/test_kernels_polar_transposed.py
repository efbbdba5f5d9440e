"""Polar-rope keys in the transposed split kernel (``_split_kernel_t``) against the float64 oracle.

Under TRITON_INTERPRET=1 on CPU. Head dim 128 (the transposed polar path needs D/8 >= 16 pairs per
part on the GPU); pair bits 6 (r2a4, 3-byte units) and 8 (r4a4, one int32 word per unit). Tolerance
as in test_kernels_decode_attention: at most a small multiple of the working-dtype reference's error.
"""


import pytest
import torch

from kvpolar.kernels import decode_attention as da
from kvpolar.kernels.decode_attention import LaunchConfig
from kvpolar.kernels.polar_rope_scores import ScoresConfig, polar_rope_scores
from kvpolar.quantizers.polar_rope import quantize_polar

from test_kernels_decode_attention import PolarStandIn, make_values, oracle, polar_quantize, run_ptx, small_caches_transposed
from kernel_checks import DEVICE, assert_scores_within_reference_error, compare_with_oracle, left_padding_mask, random_inputs  # noqa: E402

D = 128


@pytest.fixture
def transposed_calls(monkeypatch):
    """Counts launches of the transposed kernel (the test fails if polar keys took the classic one)."""
    calls = []
    real = da._launch_split_t

    def spy(query, k_op, *args):
        calls.append(k_op.fmt)
        return real(query, k_op, *args)

    monkeypatch.setattr(da, "_launch_split_t", spy)
    return calls


def check(rb, ab, pairing, value_fmt="kivi-2-32", *, batch=1, hkv=1, gqa=4, tq=1, tk=45, r=0, group=32,
          dtype=torch.float16, lengths=None, config=None, factor=3.0):
    n = tk + r
    k, v, q = random_inputs((rb, ab, pairing, value_fmt, batch, hkv, gqa, tq, tk, r, dtype),
                            batch=batch, hkv=hkv, gqa=gqa, tq=tq, n=n, d=D, dtype=dtype)
    pk = polar_quantize(k[..., :tk, :], rb, ab, group, pairing)
    vq, pv = make_values(value_fmt, v[..., :tk, :])
    rk, rv = (k[..., tk:, :], v[..., tk:, :]) if r else (None, None)
    compare_with_oracle(oracle, q, pk, pv, None, vq, rk, rv, left_padding_mask(lengths, tq, n),
                        config=small_caches_transposed(config), factor=factor, reference_key_quantizer=PolarStandIn())


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("rb_ab", [(2, 4), (4, 4)])
def test_polar_keys_transposed(rb_ab, pairing, transposed_calls):
    """Both unit layouts (3-byte units, int32 words), both pairings, a query tile of 2 x 4 rows."""
    check(*rb_ab, pairing, "kivi-2-32" if rb_ab[0] == 2 else "kivi-4-32", gqa=4, tq=2, tk=45, r=3)
    assert transposed_calls == [da.FMT_POLAR]


@pytest.mark.parametrize("gqa", [1, 8])
def test_gqa_ratios_and_odd_lengths(gqa, transposed_calls):
    """GQA 1 and 8, 77 packed tokens (off the 32-token group and 16-token block), length-1 residual."""
    check(2, 4, "half", gqa=gqa, tk=77, r=1, config=LaunchConfig(block_n=16, num_splits=3))
    assert transposed_calls == [da.FMT_POLAR]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ragged_batch_and_residual(dtype, transposed_calls):
    """Left-padded batch of 3 (one sequence shorter than the residual window), 2 KV heads, bf16 too."""
    check(2, 4, "interleaved", "kivi-4-16", batch=3, hkv=2, gqa=4, tk=70, r=6, dtype=dtype,
          lengths=[76, 40, 3], config=LaunchConfig(num_splits=2))
    assert transposed_calls == [da.FMT_POLAR]


def test_small_caches_stay_on_the_classic_kernel():
    """Below ``transposed_min_rows`` packed rows (and for 3-bit pairs) polar keys take the classic kernel."""
    def op(rows, bits):
        return da.Operand(da.FMT_POLAR, torch.zeros(1, 1, rows, 64 * bits // 8, dtype=torch.uint8), (), bits=bits)

    values = da.Operand(da.FMT_KIVI, torch.zeros(1), (), bits=2)
    cfg = LaunchConfig()
    rows = cfg.transposed_min_rows
    assert not da._use_transposed(op(rows - 1, 6), values, cfg)
    assert da._use_transposed(op(rows, 6), values, cfg)
    assert not da._use_transposed(op(rows, 3), values, cfg)
    assert not da._use_transposed(op(rows, 6), values, LaunchConfig(transposed=False))


def test_length_one_and_classic_switch(transposed_calls):
    """One packed token; ``transposed=False`` keeps polar keys on the classic kernel."""
    check(4, 4, "half", "kivi-8-32", tk=1, r=2)
    check(4, 4, "half", "kivi-8-32", tk=1, r=2, config=LaunchConfig(transposed=False))
    assert transposed_calls == [da.FMT_POLAR]


# ----- the standalone scores kernel, mode="transposed" ----------------------------------------------------------
@pytest.mark.parametrize(
    "batch,hkv,gqa,tq,tokens,bits,pairing,dtype,config",
    [
        (2, 2, 4, 1, 45, (2, 4), "half", torch.float16, ScoresConfig(blocks=2)),
        (1, 2, 8, 2, 77, (4, 4), "interleaved", torch.bfloat16, ScoresConfig(block_t=16, blocks=3)),
        (1, 1, 1, 1, 1, (2, 2), "half", torch.float16, ScoresConfig(block_t=16, blocks=1)),
        (1, 1, 4, 1, 40, (1, 1), "interleaved", torch.float16, None),
    ],
)
def test_scores_transposed_matches_reference(batch, hkv, gqa, tq, tokens, bits, pairing, dtype, config):
    g = torch.Generator().manual_seed(tokens * 31 + bits[0])
    keys = (torch.randn(batch, hkv, tokens, D, generator=g) * 1.5 + 0.3).to(dtype)
    p = quantize_polar(keys, bits[0], bits[1], 32, pairing, "shortest-arc")
    q = torch.randn(batch, hkv * gqa, tq, D, generator=g).to(dtype)
    got = polar_rope_scores(q.to(DEVICE), p.to(DEVICE), config).cpu()
    assert got.shape == (batch, hkv * gqa, tq, tokens) and got.dtype == torch.float32
    assert_scores_within_reference_error(got, q, p, gqa)


@pytest.mark.parametrize("bits", [(1, 1), (1, 3), (2, 2), (3, 1), (2, 4), (3, 3), (4, 2), (4, 4)])
def test_scores_transposed_every_code_position(bits):
    """Every radius / angle split of 2-, 4-, 6- and 8-bit pairs: each code is read at its own mantissa
    bit (``polar_pairs.read_code``: in place, shifted up or down by a shared amount, or at bit 16)
    with the metadata folded for that bit; the folding's float32 rounding must stay below the 16-bit
    reference's error for the coarsest (1-bit) codes as for the finest. Angles over the full circle
    (``minmax`` on keys spread all round) give the largest angle scales."""
    g = torch.Generator().manual_seed(7 * bits[0] + bits[1])
    keys = (torch.randn(1, 2, 36, D, generator=g) * 2.0).half()
    p = quantize_polar(keys, bits[0], bits[1], 32, "half", "minmax")
    q = torch.randn(1, 4, 1, D, generator=g).half()
    got = polar_rope_scores(q.to(DEVICE), p.to(DEVICE), ScoresConfig(block_t=16, blocks=2)).cpu()
    assert_scores_within_reference_error(got, q, p, 2)


def test_field_instructions_give_one_plus_the_code():
    """The compiled code read (``polar_pairs.field_asm``: shift, OR of 1.0's exponent from a register
    the compiler cannot prove constant, AND), run on the host: for every code width and place
    ``read_code`` can be asked for (each mantissa position ``read_position`` picks) and the 2-bit level
    codes of polar-recursive (read at bit 20), every word gives ``1 + code * 2**(at - 23)`` in float32,
    the value the interpreted form computes with integer operations."""
    import numpy as np

    from kvpolar.kernels.polar_pairs import field_asm, read_position

    g = np.random.default_rng(0)
    words = np.concatenate([g.integers(0, 1 << 32, 4096, dtype=np.uint64).astype(np.uint32),
                            np.array([0, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 0x55555555, 0xAAAAAAAA], np.uint32)])
    places = {(shift, 2, 20) for shift in (0, 2, 4, 6)}  # polar-recursive's levels 2-4
    for width in range(1, 8):
        for lo in range(10, 17):
            for shift in range(0, 33 - width):
                at = read_position(shift, width, lo)
                if at + width <= 23:
                    places.add((shift, width, at))
    assert len(places) > 150, len(places)
    for shift, width, at in sorted(places):
        keep = (((1 << width) - 1) << at) | 0x3F800000
        got = run_ptx(field_asm(shift, at, keep), words).view(np.float32)
        code = (words >> np.uint32(shift)) & np.uint32((1 << width) - 1)
        want = (1.0 + code.astype(np.float64) * 2.0 ** (at - 23)).astype(np.float32)
        assert np.array_equal(got, want), (shift, width, at)
