"""Synthetic keys, values and queries with the structure of real LLM attention tensors.

Real keys have a few outlier channels, and those come in RoPE pairs (the polar-rope paper's
observation): each pair rotates with the token position. ``rope_keys`` reproduces that, so methods
can be compared on realistic inputs without a model download.
"""

from __future__ import annotations

import torch


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rope_pair_index(head_dim: int, pairing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel indices ``(x, y)`` of each RoPE pair: ``half`` (j, j + D/2) or ``interleaved`` (2j, 2j+1)."""
    half = head_dim // 2
    j = torch.arange(half)
    if pairing == "half":
        return j, j + half
    if pairing == "interleaved":
        return 2 * j, 2 * j + 1
    raise ValueError(f"pairing={pairing!r} is not supported; allowed: 'half', 'interleaved'")


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, pairing: str = "half") -> torch.Tensor:
    """Rotate ``x`` ``[..., T, D]`` (float32) by RoPE at ``positions`` ``[T]``."""
    d = x.shape[-1]
    ix, iy = rope_pair_index(d, pairing)
    inv_freq = base ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    angle = (positions.double()[:, None] * inv_freq[None, :]).float()  # [T, D/2]
    cos, sin = angle.cos(), angle.sin()
    xr, yr = x[..., ix], x[..., iy]
    out = x.clone()
    out[..., ix] = xr * cos - yr * sin
    out[..., iy] = xr * sin + yr * cos
    return out


def rope_keys(
    batch: int = 1,
    heads: int = 4,
    tokens: int = 256,
    head_dim: int = 128,
    outlier_pairs: int = 4,
    outlier_scale: float = 10.0,
    pairing: str = "half",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Keys ``[batch, heads, tokens, head_dim]`` after RoPE, with ``outlier_pairs`` large pairs.

    Pre-RoPE keys have a per-channel mean and scale; the chosen pairs (among the low-frequency
    ones, where real outliers sit) carry a large, stable magnitude, so after RoPE they trace rings.
    """
    g = _generator(seed)
    half = head_dim // 2
    base = torch.randn(batch, heads, tokens, head_dim, generator=g)
    channel_scale = 0.5 + torch.rand(heads, 1, head_dim, generator=g)
    channel_mean = 0.5 * torch.randn(heads, 1, head_dim, generator=g)
    pre = base * channel_scale + channel_mean
    if outlier_pairs:
        pool = torch.arange(half // 2, half)
        chosen = pool[torch.randperm(len(pool), generator=g)[:outlier_pairs]]
        ix, iy = rope_pair_index(head_dim, pairing)
        for idx in (ix[chosen], iy[chosen]):
            pre[..., idx] = pre[..., idx] * 0.2 + outlier_scale * torch.sign(channel_mean[..., idx] + 1e-3)
    keys = apply_rope(pre, torch.arange(tokens), pairing=pairing)
    return keys.to(dtype)


def gaussian(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Standard normal tensor (e.g. values, or the i.i.d. setting of the polar-recursive paper)."""
    return torch.randn(*shape, generator=_generator(seed)).to(dtype)


def low_rank_queries(
    keys_shape: tuple[int, ...], tokens: int, rank: int = 8, seed: int = 1, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """Queries ``[..., tokens, D]`` spanning a random ``rank``-dimensional subspace (SQuat's setting)."""
    g = _generator(seed)
    *lead, _, d = keys_shape
    basis = torch.linalg.qr(torch.randn(*lead, d, rank, generator=g))[0]  # [..., D, rank]
    coeff = torch.randn(*lead, tokens, rank, generator=g) * torch.linspace(3.0, 0.5, rank)
    return (coeff @ basis.transpose(-1, -2)).to(dtype)
