"""The polar-rope Triton kernels against their PyTorch references (TRITON_INTERPRET=1 without a GPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from kvpolar import synthetic  # noqa: E402
from kvpolar.kernels.polar_rope_encode import polar_rope_encode  # noqa: E402
from kvpolar.kernels.polar_rope_scores import ScoresConfig, polar_rope_scores  # noqa: E402
from kvpolar.quantizers.polar_rope import dequantize_polar, quantize_polar, unpack_codes  # noqa: E402
from kernel_checks import assert_scores_within_reference_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_keys(batch, heads, tokens, dim, dtype, pairing="half", seed=None):
    seed = int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed
    return synthetic.rope_keys(batch, heads, tokens, dim, pairing=pairing, seed=seed, dtype=dtype).to(DEVICE)


@pytest.mark.parametrize(
    "batch,hkv,gqa,tq,tokens,bits,pairing,dtype,config",
    [
        (2, 2, 4, 1, 45, (2, 4), "half", torch.float16, ScoresConfig(block_t=16, mode="angle_table")),
        (2, 2, 4, 1, 45, (2, 4), "half", torch.float16, ScoresConfig(block_t=16, mode="direct", dot=True)),
        (1, 2, 1, 3, 1, (2, 4), "half", torch.bfloat16, ScoresConfig(block_t=16, mode="direct")),
        (2, 1, 4, 2, 77, (3, 3), "interleaved", torch.bfloat16, ScoresConfig(block_t=32, mode="angle_table", dot=True)),
        (1, 2, 4, 1, 70, (4, 4), "half", torch.float16, ScoresConfig(block_t=64, mode="angle_table")),  # block > group
        (2, 2, 1, 1, 33, (1, 7), "half", torch.float16, ScoresConfig(block_t=16, mode="angle_table")),
        (1, 1, 8, 3, 50, (2, 3), "interleaved", torch.float16, ScoresConfig(block_t=32, block_q=16, mode="angle_table", dot=True)),
        (1, 1, 8, 3, 50, (2, 3), "interleaved", torch.float16, ScoresConfig(block_t=32, block_q=4, mode="direct")),
        (2, 2, 4, 1, 200, (2, 4), "half", torch.bfloat16, None),  # the default launch config
    ],
)
def test_scores_kernel_matches_reference(batch, hkv, gqa, tq, tokens, bits, pairing, dtype, config):
    keys = random_keys(batch, hkv, tokens, 64, dtype, pairing)
    p = quantize_polar(keys, bits[0], bits[1], 32, pairing, "shortest-arc")
    q = torch.randn(batch, hkv * gqa, tq, 64, device=DEVICE).to(dtype)
    got = polar_rope_scores(q, p, config)
    assert got.shape == (batch, hkv * gqa, tq, tokens) and got.dtype == torch.float32
    assert_scores_within_reference_error(got, q, p, gqa)


def test_scores_kernel_float32_and_reference_path():
    keys = random_keys(1, 2, 40, 32, torch.float32)
    p = quantize_polar(keys, 2, 4, 16, "half", "minmax")
    q = torch.randn(1, 8, 2, 32, device=DEVICE)
    exact = q.double() @ dequantize_polar(p, torch.float64).repeat_interleave(4, 1).transpose(-1, -2)
    got = polar_rope_scores(q, p, ScoresConfig(block_t=16, mode="angle_table", dot=True))
    assert (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


def close_in_dtype(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> bool:
    """Equal up to the storage dtype's rounding of numbers of size ``scale`` (one ulp, two for bf16:
    the interpreter truncates to bfloat16 where the GPU and torch round to nearest)."""
    eps = torch.finfo(b.dtype).eps * (2 if b.dtype == torch.bfloat16 else 1)
    return bool(((a.float() - b.float()).abs() <= eps * scale.float().abs() + 1e-6).all())


@pytest.mark.parametrize(
    "bits,angle_range,pairing,dtype,tokens",
    [
        ((2, 4), "shortest-arc", "half", torch.float16, 45),
        ((3, 3), "minmax", "interleaved", torch.bfloat16, 16),
        ((4, 4), "shortest-arc", "interleaved", torch.float16, 1),
        ((1, 2), "minmax", "half", torch.float16, 37),
        ((2, 5), "shortest-arc", "half", torch.float32, 20),
    ],
)
def test_encode_kernel_matches_reference_within_rounding(bits, angle_range, pairing, dtype, tokens):
    keys = random_keys(2, 2, tokens, 32, dtype, pairing)
    ref = quantize_polar(keys, bits[0], bits[1], 16, pairing, angle_range)
    got = polar_rope_encode(keys, bits[0], bits[1], 16, pairing, angle_range)
    assert got.codes.shape == ref.codes.shape and got.codes.dtype == torch.uint8
    for kind, levels in (("radius", 2 ** bits[0] - 1), ("angle", 2 ** bits[1] - 1)):
        lo, scale = getattr(ref, kind + "_min"), getattr(ref, kind + "_scale")
        size = lo.float().abs() + levels * scale.float().abs()
        assert getattr(got, kind + "_min").dtype == dtype and getattr(got, kind + "_scale").dtype == dtype
        assert close_in_dtype(getattr(got, kind + "_min"), lo, size), kind
        assert close_in_dtype(getattr(got, kind + "_scale"), scale, 2 * size / levels), kind
    (rc1, ac1), (rc2, ac2) = unpack_codes(ref), unpack_codes(got)
    # bfloat16 under the interpreter: its float32->bfloat16 cast truncates, so more codes sit one level off
    same = 0.8 if dtype == torch.bfloat16 and DEVICE == "cpu" else 0.99
    for kind, c1, c2, levels in (("radius", rc1, rc2, 2 ** bits[0] - 1), ("angle", ac1, ac2, 2 ** bits[1] - 1)):
        # a group whose values are all equal (e.g. one token) has a range of 0 and only the floor of
        # the scale (a few 1e-7): its codes round noise (any level, all decoding to the same value),
        # so the code checks are asked of the other groups; the decoded values are checked below
        scale = getattr(ref, kind + "_scale").float().repeat_interleave(16, -2)[..., :tokens, :]
        lo = getattr(ref, kind + "_min").float().repeat_interleave(16, -2)[..., :tokens, :]
        live = scale * levels > 1e-4 * (lo.abs() + 1)
        if not (dtype == torch.bfloat16 and DEVICE == "cpu"):  # (the truncating cast: see above)
            assert ((c1.int() - c2.int()).abs() <= 1)[live].all(), kind  # at most one level apart
        if live.any():
            assert (c1 == c2)[live].float().mean() >= same, kind
    # a one-level difference moves a pair by at most a radius step plus r times an angle step
    r_step = ref.radius_scale.float().amax() + 1e-6
    a_step = ref.angle_scale.float().amax() * ref.radius_scale.float().mul(2 ** bits[0]).add(ref.radius_min.float()).amax()
    diff = (dequantize_polar(got) - dequantize_polar(ref)).abs()
    assert (diff <= 1.01 * (r_step + a_step) + 1e-3).all()
