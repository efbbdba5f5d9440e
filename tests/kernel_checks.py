"""Shared pieces of the Triton kernel tests (fused decode attention, polar-rope scores): seeded random
inputs, random shapes and launches, left-padding masks, and checks of a kernel against float64 results next to the PyTorch
reference's own error."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import torch

from kvpolar.decode_attention import reference_decode_attention
from kvpolar.kernels.decode_attention import LaunchConfig, fused_decode_attention
from kvpolar.quantizers import polar_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: one unit in the last place at 1.0, per working dtype (the error floor of a tiny reference error)
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-20}


def random_inputs(seed_key: object, *, batch: int, hkv: int, gqa: int, tq: int, n: int, d: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values ``[batch, hkv, n, d]`` (keys offset and scaled, as real keys are) and queries
    ``[batch, hkv * gqa, tq, d]`` in ``dtype``, from a generator seeded by ``repr(seed_key)``."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(seed_key).encode()))
    k = (torch.randn(batch, hkv, n, d, generator=g) * 1.5 + 0.3).to(dtype)
    v = torch.randn(batch, hkv, n, d, generator=g).to(dtype)
    q = torch.randn(batch, hkv * gqa, tq, d, generator=g).to(dtype)
    return k, v, q


def random_shape(rng, max_tokens: int) -> dict:
    """A decode-attention shape drawn from the numpy generator ``rng``: ``batch``, ``hkv``, ``gqa``,
    ``tq``, ``tk`` (1 to ``max_tokens - 1`` packed tokens), ``r`` (window tokens) and, for half the batches
    of several sequences, ragged ``lengths`` (the first sequence full, the others shorter)."""
    batch, hkv = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    gqa, tq = int(rng.choice([1, 4, 8])), int(rng.choice([1, 1, 2]))
    tk, r = int(rng.integers(1, max_tokens)), int(rng.choice([0, 1, int(rng.integers(2, 40))]))
    lengths = None
    if batch > 1 and rng.random() < 0.5:
        lengths = [tk + r] + [int(rng.integers(1, tk + r + 1)) for _ in range(batch - 1)]
    return dict(batch=batch, hkv=hkv, gqa=gqa, tq=tq, tk=tk, r=r, lengths=lengths)


def random_launch(rng, num_splits: Sequence[int | None]) -> dict:
    """A launch drawn from ``rng``: ``config`` (kernel form, block, splits from ``num_splits``) and the
    working ``dtype`` (float16 seven times in ten, else bfloat16)."""
    config = LaunchConfig(transposed=bool(rng.random() < 0.5), block_n=int(rng.choice([16, 32, 64])),
                          num_splits=list(num_splits)[int(rng.integers(0, len(num_splits)))])
    return dict(config=config, dtype=torch.float16 if rng.random() < 0.7 else torch.bfloat16)


def left_padding_mask(lengths: Sequence[int] | None, tq: int, n: int) -> torch.Tensor | None:
    """bool ``[B, 1, tq, n]``: sequence ``i`` holds its last ``lengths[i]`` tokens (None: no mask)."""
    if lengths is None:
        return None
    pos = torch.arange(n)
    mask = pos[None, :] >= n - torch.tensor(lengths)[:, None]
    return mask[:, None, None, :].expand(len(lengths), 1, tq, n)


def compare_with_oracle(oracle: Callable, q, pk, pv, kq, vq, rk, rv, mask, *, config=None, factor: float = 3.0,
                        reference_key_quantizer=None, absolute: float = 0.0) -> torch.Tensor:
    """Run ``fused_decode_attention`` (on CUDA when there is one) and assert that its error against
    the float64 ``oracle(q, pk, pv, rk, rv, scale, mask)`` is at most ``factor`` times the working-dtype
    reference's own error (or one ulp of the largest output), plus ``absolute`` (a documented
    absolute bound of the kernel's own, e.g. ``kivi_value_min="product"`` on tiny values). Returns the
    kernel's output as float64."""
    scale = q.shape[-1] ** -0.5
    want = oracle(q, pk, pv, rk, rv, scale, mask)
    ref = reference_decode_attention(q, pk, pv, reference_key_quantizer or kq, vq, rk, rv, scale, mask)
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    out = fused_decode_attention(dev(q), dev(pk), dev(pv), kq, vq, dev(rk), dev(rv), scale, dev(mask), config)
    assert out.dtype == q.dtype and out.shape == q.shape
    out = out.cpu().double()
    assert torch.isfinite(out).all()
    ref_err = (ref.double() - want).abs().max().item()
    err = (out - want).abs().max().item()
    floor = ULP[q.dtype] * want.abs().max().item()
    assert err <= factor * max(ref_err, floor) + absolute, f"kernel error {err:.3g} vs reference error {ref_err:.3g}"
    return out


def oracle_with(dequantize64: Callable) -> Callable:
    """The float64 attention oracle ``oracle(q, pk, pv, rk, rv, scale, mask)`` over stored tensors
    decoded by ``dequantize64`` (packed part first, then the residual window; GQA by repetition;
    fully masked rows give zeros)."""

    def oracle(q, pk, pv, rk, rv, scale, mask):
        ks, vs = [], []
        if pk is not None:
            ks.append(dequantize64(pk))
            vs.append(dequantize64(pv))
        if rk is not None:
            ks.append(rk.double())
            vs.append(rv.double())
        k, v = torch.cat(ks, -2), torch.cat(vs, -2)
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = q.double() @ k.transpose(-1, -2) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, -1).nan_to_num(0.0) @ v

    return oracle


def assert_scores_within_reference_error(got, q, p, gqa):
    """``got`` (float32 scores) is within 2x the working-dtype reference's error of the float64 ones
    (the reference: keys rounded to the input dtype, float32 product)."""
    q, p = q.cpu(), p.to("cpu")
    exact = q.double() @ polar_rope.dequantize_polar(p, torch.float64).repeat_interleave(gqa, 1).transpose(-1, -2)
    work = q.float() @ polar_rope.dequantize_polar(p).to(q.dtype).float().repeat_interleave(gqa, 1).transpose(-1, -2)
    ref_err = (work.double() - exact).abs().max().item()
    err = (got.cpu().double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-6 * exact.abs().max().item(), (err, ref_err)
