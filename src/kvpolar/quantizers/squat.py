"""SQuat (Wang et al. 2025): KIVI keys whose quantization error avoids the prompt's query subspace.

Attention reads keys only through ``q . k``. SQuat builds, once per prompt and KV head, the
subspace the prompt's queries occupy, ``Qs = diag(s_1..s_r) V_r^T`` (``r x D``: the top-``r`` right
singular vectors of the stacked queries, scaled by their singular values), and quantizes every key
to minimise ``(k_hat - k)^T A (k_hat - k)`` with ``A = I + lam * Qs^T Qs``, greedily, block of
channels by block (as GPTQ/OBQ): block ``b`` (channels ``[s, e)``) is quantized with KIVI's
per-channel statistics, its error ``d = k_hat_b - k_b`` is absorbed by the not-yet-quantized
channels ``R = [e, D)`` through the closed-form minimiser ``k_R += M_b d`` with
``M_b = -A_RR^{-1} A_Rb``; statistics of later blocks are computed after the shift. The ``M_b``
depend on the queries only, so :meth:`SquatQuantizer.prepare` computes them once and every later
key group of the same prompt reuses them (``quantize(keys, subspace=prepared)``).

Stored form: exactly KIVI's per-channel keys (:class:`~kvpolar.quantizers.kivi.KiviChannelTensor`):
same bits/element (``bits + 32 / group_size`` for 16-bit keys), same decoding and score path; only
the codes and statistics differ. With ``lam=0`` (or ``block_size >= D``) SQuat *is* KIVI, bit for bit.
Values are quantized per token with ``kvpolar.quantizer("kivi", axis="token")``: SQuat changes keys only.

``block_size`` need not divide the head dim: the last block is then smaller
(``D = 128, block_size = 48`` gives blocks of 48, 48 and 32 channels).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch

from kvpolar.packing import pack_bits
from kvpolar.quantized import QuantizedTensor
from kvpolar.quantizers import uniform
from kvpolar.quantizers.base import Quantizer, _gqa_group
from kvpolar.quantizers.kivi import KIVI_BITS, Kivi, KiviChannelTensor
from kvpolar.registry import register
from kvpolar.validation import allowed, check_choice, check_float_tensor, check_positive_int

SUBSPACE_METHODS = ("svd", "power")
#: Extra random directions carried by block power iteration beyond ``subspace_dim`` (Halko et al.).
POWER_OVERSAMPLING = 8


@dataclasses.dataclass(frozen=True)
class SquatConfig:
    """SQuat parameters.

    Attributes:
        bits, group_size: KIVI's per-channel key quantizer (codes of ``bits`` bits; ``group_size``
            tokens share a per-channel minimum and scale).
        block_size: channels quantized together before the rest absorb their error.
        subspace_dim: ``r``, the rank of the query subspace.
        lam: weight of the error inside the query subspace (``A = I + lam * Qs^T Qs``); 0 = KIVI.
        subspace: ``"svd"`` (exact, float32) or ``"power"`` (block power iteration).
        power_iterations, seed: steps and seed of the power iteration (``subspace="power"``).
    """

    bits: int = 2
    group_size: int = 32
    block_size: int = 64
    subspace_dim: int = 20
    lam: float = 1e-3
    subspace: str = "svd"
    power_iterations: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, KIVI_BITS)
        check_positive_int("group_size", self.group_size)
        check_positive_int("block_size", self.block_size)
        check_positive_int("subspace_dim", self.subspace_dim)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not (
            math.isfinite(self.lam) and self.lam >= 0
        ):
            raise allowed("lam", self.lam, "a finite number >= 0")
        check_choice("subspace", self.subspace, SUBSPACE_METHODS)
        check_positive_int("power_iterations", self.power_iterations)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise allowed("seed", self.seed, "an integer")


@dataclasses.dataclass(frozen=True, eq=False)
class SquatSubspace:
    """The per-prompt state of SQuat, computed once by :meth:`SquatQuantizer.prepare`.

    Attributes:
        qs: ``Qs = diag(s) V_r^T``, float32 ``[..., r, D]``, one per KV head (leading shape of the keys).
        block_matrices: one float32 ``[..., D - e_b, e_b - s_b]`` per channel block ``[s_b, e_b)``:
            ``M_b = -A_RR^{-1} A_Rb`` with ``A = I + lam * Qs^T Qs`` and ``R = [e_b, D)`` (the last
            block's matrix has zero rows).
        block_size, lam: the parameters the matrices were built with (checked when used).
    """

    qs: torch.Tensor
    block_matrices: tuple[torch.Tensor, ...]
    block_size: int
    lam: float

    @property
    def head_dim(self) -> int:
        return int(self.qs.shape[-1])

    @property
    def leading_shape(self) -> tuple[int, ...]:
        return tuple(self.qs.shape[:-2])

    def to(self, device: torch.device | str) -> SquatSubspace:
        return dataclasses.replace(
            self, qs=self.qs.to(device), block_matrices=tuple(m.to(device) for m in self.block_matrices)
        )


def channel_blocks(head_dim: int, block_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each channel block; the last one is smaller when ``block_size`` does not divide D."""
    return [(s, min(s + block_size, head_dim)) for s in range(0, head_dim, block_size)]


def svd_subspace(stacked: torch.Tensor, rank: int) -> torch.Tensor:
    """``diag(s_1..s_r) V_r^T`` of ``stacked`` ``[..., N, D]`` by a full SVD in float32: ``[..., r, D]``.

    Fewer than ``rank`` singular directions (``N < rank``) leave zero rows.
    """
    _, s, vh = torch.linalg.svd(stacked.float(), full_matrices=False)
    qs = s[..., :rank, None] * vh[..., :rank, :]
    return _pad_rows(qs, rank)


def power_subspace(stacked: torch.Tensor, rank: int, iterations: int, seed: int) -> torch.Tensor:
    """Same as :func:`svd_subspace` by block power iteration (randomized SVD, Halko et al. 2011).

    One pass over the queries forms the Gram matrix ``G = Q^T Q`` (``D x D``, float32 products,
    then float64); ``rank + POWER_OVERSAMPLING`` seeded Gaussian directions go through
    ``iterations`` steps of ``V <- orth(G V)``, and a Rayleigh-Ritz step on ``V^T G V`` picks the
    top ``rank`` directions and their singular values. Cost: ``N D^2`` flops for ``G`` against the
    SVD's iterative ``O(N D^2)``; every later step is on ``D x k`` matrices, and the only
    decompositions are ``k x k`` (``k <= 32`` at the default sizes, which GPUs solve batched).
    Float32 ``[..., rank, D]``.
    """
    q = stacked.float()
    gram = (q.transpose(-1, -2) @ q).double()  # [..., D, D]
    *lead, d, _ = gram.shape
    k = min(rank + POWER_OVERSAMPLING, d)
    gen = torch.Generator().manual_seed(seed)
    v = _orthonormalize(torch.randn(*lead, d, k, generator=gen, dtype=torch.float64).to(gram.device))
    for _ in range(iterations):
        v = _orthonormalize(gram @ v)
    evals, w = torch.linalg.eigh(v.transpose(-1, -2) @ gram @ v)  # ascending
    top = min(rank, k)
    evals, w = evals.flip(-1)[..., :top], w.flip(-1)[..., :top]
    qs = evals.clamp_min(0).sqrt()[..., :, None] * (v @ w).transpose(-1, -2)
    return _pad_rows(qs.float(), rank)


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``y`` ``[..., D, k]`` (float64): ``y U diag(l)^-1/2`` from the
    ``k x k`` eigendecomposition ``y^T y = U diag(l) U^T``; directions with ``l`` below 1e-12 of the
    largest (a rank-deficient ``y``) become zero columns."""
    evals, u = torch.linalg.eigh(y.transpose(-1, -2) @ y)
    keep = evals > 1e-12 * evals.amax(-1, keepdim=True).clamp_min(1e-300)
    inv_sqrt = torch.where(keep, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
    return (y @ u) * inv_sqrt[..., None, :]


def block_matrices(qs: torch.Tensor, lam: float, block_size: int) -> tuple[torch.Tensor, ...]:
    """``M_b = -A_RR^{-1} A_Rb`` for every channel block, with ``A = I + lam * Qs^T Qs``.

    Solved in float64 (``A`` is as ill-conditioned as ``lam * s_1^2`` is large), returned in float32.
    """
    d = qs.shape[-1]
    q64 = qs.double()
    a = lam * (q64.transpose(-1, -2) @ q64) + torch.eye(d, dtype=torch.float64, device=qs.device)
    out = []
    for start, end in channel_blocks(d, block_size):
        a_rr, a_rb = a[..., end:, end:], a[..., end:, start:end]
        m = -torch.linalg.solve(a_rr, a_rb) if end < d else a_rb.new_zeros(*a_rb.shape)
        out.append(m.float())
    return tuple(out)


def _pad_rows(qs: torch.Tensor, rank: int) -> torch.Tensor:
    missing = rank - qs.shape[-2]
    if missing <= 0:
        return qs
    return torch.cat([qs, qs.new_zeros(*qs.shape[:-2], missing, qs.shape[-1])], dim=-2)


def quantize_keys(
    keys: torch.Tensor, subspace: SquatSubspace, bits: int, group_size: int
) -> KiviChannelTensor:
    """Block-sequential SQuat quantization of ``keys`` ``[..., T, D]`` into KIVI per-channel form.

    For each channel block ``b`` in order: KIVI statistics (min/max per channel over each group of
    ``group_size`` tokens, stored in ``keys.dtype``) of the current (shifted) values, codes against
    the stored statistics, then ``k_R += (k_hat_b - k_b) @ M_b^T`` for the channels after it.
    """
    tokens, d = keys.shape[-2], keys.shape[-1]
    work = uniform.pad_to_multiple(keys, group_size, dim=-2).float()
    work = work.reshape(*keys.shape[:-2], -1, group_size, d).clone()  # [..., ng, G, D]
    codes, scales, minimums = [], [], []
    for (start, end), m in zip(channel_blocks(d, subspace.block_size), subspace.block_matrices):
        block = work[..., start:end]
        scale, minimum = uniform.minmax_scale(block.amin(-2), block.amax(-2), bits, keys.dtype)
        c = uniform.encode(block, scale.unsqueeze(-2), minimum.unsqueeze(-2), bits)
        codes.append(c)
        scales.append(scale)
        minimums.append(minimum)
        if end < d:
            err = uniform.decode(c, scale.unsqueeze(-2), minimum.unsqueeze(-2)) - block
            work[..., end:] += err @ m.unsqueeze(-3).transpose(-1, -2)
    all_codes = torch.cat(codes, dim=-1).reshape(*keys.shape[:-2], -1, d)[..., :tokens, :]
    return KiviChannelTensor(
        shape=keys.shape, dtype=keys.dtype, codes=pack_bits(all_codes, bits, check_range=False),  # (clamped by encode)
        scale=torch.cat(scales, dim=-1), minimum=torch.cat(minimums, dim=-1),
        bits=bits, group_size=group_size,
    )


class SquatQuantizer(Quantizer):
    """``kvpolar.quantizer("squat", bits=2, group_size=32, block_size=64, subspace_dim=20, lam=1e-3,
    subspace="svd")``: keys only (values: ``kvpolar.quantizer("kivi", axis="token")``)."""

    name = "squat"
    Config = SquatConfig
    stored_type = KiviChannelTensor
    context_keys = frozenset({"queries", "subspace"})
    dequantize_kernel = True  # KIVI's stored form and reconstruction

    config: SquatConfig

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._kivi = Kivi(bits=self.config.bits, group_size=self.config.group_size, axis="channel")

    def quantize(self, x: torch.Tensor, **context: Any) -> QuantizedTensor:
        """Quantize keys ``x`` ``[..., T, D]`` (float16/bfloat16/float32) given the prompt's queries.

        Context (exactly one of):
            queries: the prompt's queries, float, ``[..., Tq, D]`` with the keys' leading shape
                (one subspace per leading index), or GQA-stacked ``[B, Hq, Tq, D]`` against keys
                ``[B, Hkv, T, D]`` (any leading dims before the head axis must match) with ``Hq`` a
                multiple of ``Hkv``: query head ``h`` belongs to KV head ``h // (Hq // Hkv)`` and the
                ``Hq // Hkv`` heads of a group are stacked into one ``(Hq // Hkv * Tq) x D`` matrix.
            subspace: a :class:`SquatSubspace` from :meth:`prepare` with the keys' leading shape,
                to quantize later key groups of the same prompt without recomputing anything.

        Returns:
            a :class:`KiviChannelTensor`, decoded and scored exactly like KIVI's keys.
        """
        return super().quantize(x, **context)

    def prepare(self, queries: torch.Tensor, kv_heads: int | None = None) -> SquatSubspace:
        """The per-prompt subspace and block matrices, for ``quantize(keys, subspace=...)``.

        Args:
            queries: ``[..., Tq, D]`` float; with ``kv_heads`` set, ``[..., Hq, Tq, D]`` whose
                query heads are stacked per KV head (``Hq`` a multiple of ``kv_heads``).
            kv_heads: number of KV heads, or None for one subspace per leading index of ``queries``.
        Returns:
            a :class:`SquatSubspace` whose leading shape is that of the keys it applies to.
        """
        check_float_tensor("queries", queries)
        c = self.config
        d = queries.shape[-1]
        self.check_head_dim(d)
        if kv_heads is not None:
            if queries.dim() < 3:
                raise ValueError(
                    f"queries has shape {tuple(queries.shape)}; kv_heads={kv_heads} needs [..., Hq, Tq, D]"
                )
            hq = queries.shape[-3]
            if not isinstance(kv_heads, int) or kv_heads <= 0 or hq % kv_heads:
                raise allowed("kv_heads", kv_heads, f"a positive divisor of the {hq} query heads")
            lead = queries.shape[:-3]
            queries = queries.reshape(*lead, kv_heads, (hq // kv_heads) * queries.shape[-2], d)
        if c.subspace == "svd":
            qs = svd_subspace(queries, c.subspace_dim)
        else:
            qs = power_subspace(queries, c.subspace_dim, c.power_iterations, c.seed)
        return SquatSubspace(
            qs=qs, block_matrices=block_matrices(qs, float(c.lam), c.block_size),
            block_size=c.block_size, lam=float(c.lam),
        )

    def check_head_dim(self, head_dim: int) -> None:
        if self.config.subspace_dim > head_dim:
            raise ValueError(
                f"subspace_dim={self.config.subspace_dim} exceeds the head dim {head_dim}; "
                f"allowed: 1..{head_dim}"
            )
        if self.config.block_size >= head_dim:  # Python's warning registry shows each message once
            warnings.warn(
                f"squat: block_size={self.config.block_size} covers the whole head dim {head_dim}, so no "
                "channels are left to absorb the error and SQuat gives exactly KIVI's codes; use a "
                f"block_size below {head_dim} (the paper: 2 blocks, block_size = head_dim / 2)",
                UserWarning,
                stacklevel=3,
            )

    def _quantize(
        self, x: torch.Tensor, queries: torch.Tensor | None = None, subspace: SquatSubspace | None = None
    ) -> KiviChannelTensor:
        if (queries is None) == (subspace is None):
            given = "both" if queries is not None else "neither"
            raise ValueError(
                f"quantizer 'squat' needs exactly one of queries=<prompt queries [..., Tq, D]> or "
                f"subspace=<SquatQuantizer.prepare(queries)>; got {given}"
            )
        if queries is not None:
            subspace = self._subspace_for(x, queries)
        assert subspace is not None
        self._check_subspace(x, subspace)
        return quantize_keys(x, subspace, self.config.bits, self.config.group_size)

    def _subspace_for(self, keys: torch.Tensor, queries: torch.Tensor) -> SquatSubspace:
        check_float_tensor("queries", queries)
        if queries.shape[-1] != keys.shape[-1]:
            raise ValueError(
                f"queries have head dim {queries.shape[-1]}; the keys have {keys.shape[-1]}"
            )
        if queries.device != keys.device:
            raise ValueError(f"queries are on {queries.device}; the keys on {keys.device}")
        lead_q, lead_k = tuple(queries.shape[:-2]), tuple(keys.shape[:-2])
        if lead_q == lead_k:
            return self.prepare(queries)
        _gqa_group(lead_q, lead_k, "queries")
        return self.prepare(queries, kv_heads=lead_k[-1])

    def _check_subspace(self, keys: torch.Tensor, subspace: SquatSubspace) -> None:
        if not isinstance(subspace, SquatSubspace):
            raise TypeError(f"subspace must be a SquatSubspace (from prepare); got {type(subspace).__name__}")
        c = self.config
        if subspace.block_size != c.block_size or subspace.lam != float(c.lam):
            raise ValueError(
                f"subspace was prepared with block_size={subspace.block_size}, lam={subspace.lam}; "
                f"this quantizer has block_size={c.block_size}, lam={c.lam}"
            )
        if subspace.head_dim != keys.shape[-1] or subspace.leading_shape != tuple(keys.shape[:-2]):
            raise ValueError(
                f"subspace covers {subspace.leading_shape} heads of dim {subspace.head_dim}; the keys "
                f"have shape {tuple(keys.shape)} (leading shape and head dim must match)"
            )
        if subspace.qs.device != keys.device:
            raise ValueError(f"subspace is on {subspace.qs.device}; the keys on {keys.device}")

    # Storage, decoding and scores are KIVI's, unchanged.
    def _check_stored(self, p: Any) -> None:
        self._kivi._check_stored(p)

    def _dequantize(self, p: QuantizedTensor) -> torch.Tensor:
        return self._kivi._dequantize(p)

    def _scores(self, q: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        return self._kivi._scores(q, p)


register(SquatQuantizer)
