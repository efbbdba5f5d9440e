"""polar-recursive keys and values by parts in the transposed decode kernel
(kernels/polar_recursive_parts.py) against the float64 oracle, under TRITON_INTERPRET=1 on CPU.

Head dim 128 (each part is the tensor cores' K of 16); the transposed kernel is forced for these
small caches (``small_caches_transposed``) and a spy checks it is the kernel that ran.
"""

import dataclasses

import pytest
import torch

import kvpolar
from kvpolar.kernels import decode_attention as da

pytest.importorskip("triton")
from kvpolar.kernels import polar_recursive_parts as parts  # noqa: E402
from test_kernels_decode_attention import small_caches_transposed  # noqa: E402
from test_kernels_decode_formats import check, polar  # noqa: E402

D = 128
KIVI2_K = ("kivi", {"bits": 2, "group_size": 32, "axis": "channel"})
KIVI2_V = ("kivi", {"bits": 2, "group_size": 32, "axis": "token"})
PAIRS = {"polar-polar": (polar(), polar()), "polar-kivi": (polar(), KIVI2_V), "kivi-polar": (KIVI2_K, polar())}


@pytest.fixture
def transposed_launches(monkeypatch):
    """(key format, value format) of every launch of the transposed kernel."""
    seen = []
    launch = da._launch_split_t

    def spy(query, k_op, v_op, *args, **kwargs):
        seen.append((k_op.fmt, v_op.fmt))
        return launch(query, k_op, v_op, *args, **kwargs)

    monkeypatch.setattr(da, "_launch_split_t", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_parts_against_the_oracle_ragged(pair, dtype, transposed_launches):
    out = check(*PAIRS[pair], batch=3, gqa=4, tk=50, r=5, dtype=dtype, lengths=[55, 20, 0], d=D,
                config=small_caches_transposed(None))
    assert len(transposed_launches) == 1
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # a fully masked row gives zeros


@pytest.mark.parametrize("tk,gqa,tq", [(1, 1, 1), (33, 8, 1), (70, 4, 3)])
def test_lengths_gqa_and_query_tokens(tk, gqa, tq, transposed_launches):
    check(*PAIRS["polar-polar"], hkv=1 if gqa == 8 else 2, gqa=gqa, tq=tq, tk=tk, r=0 if tk == 1 else 3, d=D,
          config=small_caches_transposed(None))
    assert transposed_launches == [(6, 6)]


def _rows(p):
    """``p`` with codes and radii one row per token (the layout before tokens-contiguous storage)."""
    if type(p).__name__ != "PolarRecursiveTensor":
        return p
    return dataclasses.replace(p, codes=p.codes.contiguous(), radii=p.radii.contiguous())


@pytest.mark.parametrize("layout", ["tokens", "rows"])
def test_both_layouts_in_the_transposed_kernel(layout, transposed_launches):
    """Codes and radii stored tokens-contiguous (the quantizer's layout) or a row per token (e.g. a
    cache whose first part held one token) are read through their strides alike."""
    hook = _rows if layout == "rows" else lambda p: p
    check(*PAIRS["polar-polar"], batch=2, gqa=4, tk=45, r=4, lengths=[49, 30], d=D,
          config=small_caches_transposed(None), stored_hook=hook)
    assert transposed_launches == [(6, 6)]


@pytest.mark.parametrize("keys,layout,tk,gqa,tq", [
    *[("subtrees", layout, *shape) for layout in ("tokens", "rows") for shape in ((1, 1, 1), (45, 4, 1), (70, 8, 2))],
    ("columns", "tokens", 45, 4, 1), ("columns", "rows", 70, 8, 2),
])
def test_key_part_forms(keys, layout, tk, gqa, tq, transposed_launches):
    """Both forms of ``LaunchConfig.polar_recursive_keys``: "subtrees" (the default: levels above the
    leaves once per subtree, ``[BN, NJ, 2]`` leaves reshaped into each part) and "columns" (``[BN,
    2 NJ]`` tiles) against the oracle, ragged, both layouts."""
    hook = _rows if layout == "rows" else lambda p: p
    cfg = dataclasses.replace(small_caches_transposed(None), polar_recursive_keys=keys)
    batch, lengths = (2, [tk + 3, max(tk - 10, 1)]) if tk > 1 else (1, None)
    check(*PAIRS["polar-polar"], batch=batch, hkv=1 if gqa == 8 else 2, gqa=gqa, tq=tq, tk=tk, r=3, d=D,
          lengths=lengths, config=cfg, stored_hook=hook)
    check(*PAIRS["polar-kivi"], gqa=gqa, hkv=1 if gqa == 8 else 2, tq=tq, tk=tk, r=3, d=D, config=cfg,
          stored_hook=hook)
    assert transposed_launches == [(6, 6), (6, 1)]


def test_polar_recursive_keys_setting_is_checked():
    with pytest.raises(ValueError, match="polar_recursive_keys='joined'"):
        da.LaunchConfig(polar_recursive_keys="joined")


def test_small_caches_take_the_transposed_kernel(transposed_launches):
    """Like turbo, the paper's setting takes the transposed kernel however few tokens are packed (the
    classic kernel gathers its cos / sin tables per element), keys or values alike."""
    check(*PAIRS["polar-polar"], gqa=4, tk=40, r=3, d=D)
    check(*PAIRS["polar-kivi"], gqa=4, tk=40, r=3, d=D)
    check(*PAIRS["kivi-polar"], gqa=4, tk=40, r=3, d=D)
    assert transposed_launches == [(6, 6), (6, 1), (1, 6)]


@pytest.mark.parametrize("config", [da.LaunchConfig(transposed=False), da.LaunchConfig(transposed_max_rows=2)],
                         ids=["switched-off", "many-query-rows"])
def test_tokens_contiguous_layout_in_the_classic_kernel(config, transposed_launches):
    """Where the classic kernel runs (the transposed one switched off, or more query rows than
    ``transposed_max_rows``), it reads rows: the launch copies the tokens-contiguous codes and radii
    into rows, and the result matches the oracle."""
    keys = kvpolar.quantizer("polar-recursive").quantize(torch.randn(1, 2, 40, D, dtype=torch.float16))
    assert keys.codes.stride(-2) == 1
    check(*PAIRS["polar-polar"], gqa=4, tk=40, r=3, d=D, config=config)
    assert transposed_launches == []


@pytest.mark.parametrize("pair", [(polar(codebook="online"), polar()), (polar(), polar(levels=3, bits=(4, 2, 2))),
                                  (polar(bits=(3, 2, 2, 2)), KIVI2_V)], ids=["online", "levels", "bits"])
def test_other_settings_take_the_classic_kernel(pair, transposed_launches):
    check(*pair, gqa=4, tk=40, r=3, d=D, config=small_caches_transposed(None))
    assert transposed_launches == []


def test_analytic_level1_codebook_is_the_uniform_grid_the_kernel_computes():
    keys = kvpolar.quantizer("polar-recursive").quantize(torch.randn(1, 1, 4, D))
    assert parts.uniform_level1(keys.analytic_codebooks)
    online = kvpolar.quantizer("polar-recursive", codebook="online").quantize(torch.randn(1, 1, 64, D))
    assert not parts.uniform_level1(online.codebooks.reshape(-1)[:16] + 0.05)
