"""Decode attention over a quantized KV cache: the PyTorch reference every fused kernel matches.

The cache for one layer holds, per sequence and KV head, a packed part (``QuantizedTensor`` keys and
values, ``Tk`` tokens) followed by a full-precision residual window (``R`` newest tokens). Attention
for ``Tq`` new queries runs over the ``N = Tk + R`` keys in that order, without ever materialising
dequantized keys or values: scores come from ``key_quantizer.scores`` and the output from
``value_quantizer.weighted_sum``.
"""

from __future__ import annotations

import torch

from kvpolar.quantized import QuantizedTensor
from kvpolar.quantizers.base import Quantizer

#: Most query rows per KV head (GQA group x query tokens) a step may bring to the fused kernel, which
#: holds them in one tile: 64 tokens at GQA 4, enough for decoding and speculative verify steps. On an
#: H100 every preset was checked at 256 rows; a 512-token step (2048 rows) asked for 685 KB of shared
#: memory (the limit: 227 KB) and failed. Longer steps (a prefill in chunks, the next turn of a
#: conversation appended to the cache) are compute-bound; the cache's attention dequantizes the layer
#: for them and calls SDPA (``kvpolar.cache.attention``; benchmarks/README.md, eighteenth session).
MAX_FUSED_QUERY_ROWS = 256


def query_rows_per_kv_head(query: torch.Tensor, kv_heads: int) -> int:
    """The rows of one KV head's query tile, GQA group x query tokens (``query`` ``[B, Hq, Tq, D]``),
    the count ``MAX_FUSED_QUERY_ROWS`` bounds."""
    return query.shape[1] // kv_heads * query.shape[2]


def reference_decode_attention(
    query: torch.Tensor,
    keys: QuantizedTensor | None,
    values: QuantizedTensor | None,
    key_quantizer: Quantizer | None,
    value_quantizer: Quantizer | None,
    residual_keys: torch.Tensor | None,
    residual_values: torch.Tensor | None,
    scale: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``query`` over packed keys/values plus the residual window.

    Args:
        query: ``[B, Hq, Tq, D]`` float16/bfloat16/float32.
        keys, values: packed ``[B, Hkv, Tk, D]`` (both or neither); ``Hq`` is a multiple of ``Hkv``.
        key_quantizer, value_quantizer: the quantizers that produced ``keys`` / ``values``.
        residual_keys, residual_values: ``[B, Hkv, R, D]`` full precision, or None (R = 0).
        scale: softmax scale, usually ``D ** -0.5``.
        attention_mask: bool, broadcastable to ``[B, Hq, Tq, N]`` (``N = Tk + R``), True = attend
            (the ``scaled_dot_product_attention`` convention); None = attend to all. Rows with no
            key to attend to return zeros.

    Returns:
        ``[B, Hq, Tq, D]`` in ``query.dtype``.
    """
    if (keys is None) != (values is None):
        raise ValueError("keys and values must be both given or both None")
    if keys is None and residual_keys is None:
        raise ValueError("attention needs keys: both the packed part and the residual window are empty")
    parts = []
    if keys is not None:
        assert key_quantizer is not None
        parts.append(key_quantizer.scores(query, keys))
    if residual_keys is not None:
        parts.append(_grouped_matmul(query.float(), residual_keys.float().transpose(-1, -2)))
    scores = torch.cat(parts, dim=-1) * scale
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.zeros(*query.shape[:-1], query.shape[-1], dtype=torch.float32, device=query.device)
    tk = 0
    if values is not None:
        assert value_quantizer is not None
        tk = values.num_tokens
        out = out + value_quantizer.weighted_sum(weights[..., :tk], values)
    if residual_values is not None:
        out = out + _grouped_matmul(weights[..., tk:], residual_values.float())
    return out.to(query.dtype)


def _grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` ``[B, Hq, M, K]`` @ ``b`` ``[B, Hkv, K, N]`` with query heads grouped per KV head."""
    bsz, hq, m, k = a.shape
    hkv = b.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {hkv}")
    out = a.reshape(bsz, hkv, (hq // hkv) * m, k) @ b
    return out.reshape(bsz, hq, m, b.shape[-1])
