"""The ``"kvpolar"`` attention implementation registered with ``transformers``.

Mask format: the same boolean ``[B, 1, Tq, N]`` masks as ``sdpa`` (True = attend; ``None`` when
causal without padding), registered through ``AttentionMaskInterface``; columns are the cache's
tokens in order (packed part, then residual window, then the new tokens).

Dispatch per call:
* not a kvpolar quantized layer (no cache, a ``DynamicCache``, a full-precision layer): ``sdpa``; a
  step that reads cached tokens from a cache that is not kvpolar's warns once (``generate`` without
  the cache ``kvpolar.enable`` returned keeps every key and value in 16 bits);
* first forward of a layer (the prompt): ``sdpa`` on the unquantized prompt;
* nothing packed yet: ``sdpa`` over the 16-bit residual window;
* a long step after the first, more than ``MAX_FUSED_QUERY_ROWS`` (256) query rows per KV head (GQA
  group x new tokens: a prefill in chunks, the next turn of a conversation): ``sdpa`` over the layer
  dequantized (``QuantizedLayer.dequantized``, a transient 16-bit copy of a few sequences at a time,
  at most ``LONG_STEP_BYTES``; on CUDA written by ``kvpolar.kernels.dequantize`` where it reads the
  format). Such steps are compute-bound, and the fused kernel holds all rows in one tile;
* otherwise: decode attention over packed + residual, never dequantizing the packed part: on CUDA
  ``kvpolar.kernels.decode_attention.fused_decode_attention`` if it is installed, else (and on CPU)
  ``kvpolar.decode_attention.reference_decode_attention``.
After attention the layer compresses its window (see ``layer.py``). Replayed decode steps
(``kvpolar.cache.graphed``: the layer's window in fixed-size buffers) attend the buffers' real tokens,
their count read on the device, and leave the layer's host-side state alone.

SDPA calls of decode-size steps over cached tokens (fewer queries than keys, at most
``MAX_FUSED_QUERY_ROWS`` query rows per KV head: decode and verify steps over the 16-bit window or a
16-bit layer) prefer PyTorch's flash and memory-efficient backends to its cuDNN one
(``SDPA_PRIORITY``): cuDNN builds a graph on the host for every new key length, i.e. every step.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvpolar.cache.layer import take_pending
from kvpolar.decode_attention import MAX_FUSED_QUERY_ROWS, query_rows_per_kv_head, reference_decode_attention

ATTENTION_NAME = "kvpolar"
#: most bytes of the transient 16-bit keys and values a long step dequantizes at once (whole sequences;
#: at least one): 32k tokens of 8 KV heads of 128 channels take 128 MiB per sequence
LONG_STEP_BYTES = 1 << 30
_FUSED: dict[str, Any] = {}
_WARNED_FOREIGN_CACHE = False
#: PyTorch SDPA backends (``torch.nn.attention.SDPBackend`` names) in the order kvpolar's SDPA calls
#: over cached tokens prefer them on CUDA: flash and memory-efficient before cuDNN, which builds a
#: cuDNN graph on the host for each new key length, once per decode step: 22-24 ms per step of an
#: 8B-shaped model at 32k tokens on the H100 with torch 2.11 (``benchmarks/README.md``, twenty-second
#: session). ``None``: PyTorch's own order. A prompt's first forward (as many queries as keys) and long
#: steps (more query rows per KV head than ``MAX_FUSED_QUERY_ROWS``) keep PyTorch's order: there the
#: graph is built once per long step, and which backend computes faster is not measured here.
SDPA_PRIORITY: tuple[str, ...] | None = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def register_attention() -> None:
    """Register ``"kvpolar"`` with ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, kvpolar_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def kvpolar_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query`` ``[B, Hq, Tq, D]``; returns ``([B, Tq, Hq, D], None)`` like ``sdpa_attention_forward``."""
    layer = take_pending(key)
    if layer is not None and layer.window_buffers is not None:
        _check_module(module, layer)
        return _decode_buffered(query, layer, scaling), None
    if layer is None or layer.plan.full_precision:
        if layer is None and key.shape[-2] > query.shape[-2]:
            _warn_foreign_cache()
        with sdpa_backends(query, key):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
    _check_module(module, layer)
    mask = _bool_mask(attention_mask, query, layer.seen)
    # which new tokens are real (None: all; without a mask from the model there is no padding)
    new_valid = None if attention_mask is None else mask[:, 0, :, -query.shape[-2]:].any(dim=-2)
    if layer.seen == query.shape[-2] or layer.packed_keys is None:
        with sdpa_backends(query, layer.keys):
            out, _ = sdpa_attention_forward(
                module, query, layer.keys, layer.values, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
    elif query_rows_per_kv_head(query, key.shape[1]) > MAX_FUSED_QUERY_ROWS:
        out = _attend_dequantized(module, query, layer, attention_mask, dropout, scaling, **kwargs)
    else:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        residual = layer.residual_tokens > 0
        out = _decode(
            query, layer.packed_keys, layer.packed_values, layer.key_quantizer, layer.value_quantizer,
            layer.keys if residual else None, layer.values if residual else None, scale, mask,
        ).transpose(1, 2).contiguous()
    layer.after_attention(new_valid, query)
    return out, None


def _decode_buffered(query: torch.Tensor, layer: Any, scaling: float | None) -> torch.Tensor:
    """A replayed decode step's attention (``layer.window_buffers`` set): the packed part (a 16-bit
    layer's whole cache) plus the window buffers' first ``length`` tokens, the count read on the device
    by the fused kernel (on the CPU, where nothing is replayed, by the host from the buffers'
    ``length``); ``[B, Tq, Hq, D]``.
    The model's mask is not read (one built on the host for one step would be stale in the next
    replay): replayed steps are one-token steps without sliding windows (``kvpolar.cache.graphed``
    checks), whose causal mask admits every cached token but padding, which the buffers'
    ``attention_mask`` (fixed for the stretch) excludes."""
    buffers = layer.window_buffers
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    packed_keys, packed_values = buffers.packed_keys, buffers.packed_values
    args = (packed_keys, packed_values, buffers.key_quantizer, buffers.value_quantizer)
    kernel = fused_kernel(query)
    if kernel is not None:
        if packed_keys is not None and not kernel.supports(packed_keys, packed_values):
            raise ValueError(f"layer {layer.layer_idx}: the fused decode kernel does not read keys stored as "
                             f"{type(packed_keys).__name__} with values stored as "
                             f"{type(packed_values).__name__}, which replayed decode steps need")
        out = kernel.fused_decode_attention(query, *args, buffers.keys, buffers.values, scale,
                                            buffers.attention_mask, residual_length=buffers.length)
    else:
        n = int(buffers.length)
        mask = buffers.attention_mask
        if mask is not None:
            mask = mask[..., :mask.shape[-1] - buffers.keys.shape[-2] + n]
        out = reference_decode_attention(query, *args, buffers.keys[:, :, :n], buffers.values[:, :, :n], scale,
                                         mask)
    layer.awaiting_attention = False
    return out.transpose(1, 2).contiguous()


def _attend_dequantized(module: torch.nn.Module, query: torch.Tensor, layer: Any, attention_mask: torch.Tensor | None,
                        dropout: float, scaling: float | None, **kwargs: Any) -> torch.Tensor:
    """SDPA over the layer dequantized, a few sequences at a time so that the transient 16-bit copy
    stays within ``LONG_STEP_BYTES`` (at least one sequence); returns ``[B, Tq, Hq, D]``."""
    per_sequence = 2 * layer.num_heads * layer.seen * layer.head_dim * query.element_size()
    step = max(1, LONG_STEP_BYTES // per_sequence)
    outs = []
    for start in range(0, query.shape[0], step):
        rows = slice(start, start + step)
        keys, values = layer.dequantized(rows)
        mask = attention_mask if attention_mask is None or attention_mask.shape[0] == 1 else attention_mask[rows]
        out, _ = sdpa_attention_forward(module, query[rows], keys, values, mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
        outs.append(out)
        del keys, values
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def sdpa_backends(query: torch.Tensor, keys: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context of an SDPA call of ``query`` ``[B, Hq, Tq, D]`` over ``keys`` ``[B, Hkv, Tk, D]``: on
    CUDA, for a decode-size step over cached tokens (``Tq < Tk``, at most ``MAX_FUSED_QUERY_ROWS`` query
    rows per KV head), ``SDPA_PRIORITY`` as PyTorch's backend priority; else none."""
    decode_size = query.shape[-2] < keys.shape[-2] and query_rows_per_kv_head(query, keys.shape[1]) <= MAX_FUSED_QUERY_ROWS
    if SDPA_PRIORITY is None or query.device.type != "cuda" or not decode_size:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in SDPA_PRIORITY], set_priority=True)


def _warn_foreign_cache() -> None:
    global _WARNED_FOREIGN_CACHE
    if not _WARNED_FOREIGN_CACHE:
        _WARNED_FOREIGN_CACHE = True
        warnings.warn(
            "kvpolar: a model with attn_implementation='kvpolar' is decoding over a cache that is not a "
            "kvpolar QuantizedKVCache (e.g. generate() without the cache kvpolar.enable returned), so its keys "
            "and values stay in 16 bits; pass model.generate(ids, **kvpolar.cache_kwargs(model, cache))",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_module(module: torch.nn.Module, layer: Any) -> None:
    config = getattr(module, "config", None)
    layers = getattr(config, "num_hidden_layers", layer.num_model_layers)
    if getattr(module, "layer_idx", layer.layer_idx) != layer.layer_idx or layers != layer.num_model_layers:
        raise ValueError(
            f"this QuantizedKVCache was built for a model of {layer.num_model_layers} layers; it is being "
            f"used by layer {getattr(module, 'layer_idx', '?')} of a model with {layers}: build one cache per model"
        )


def _bool_mask(mask: torch.Tensor | None, query: torch.Tensor, kv_len: int) -> torch.Tensor | None:
    """The mask as bool ``[B, 1|Hq, Tq, N]`` (True = attend); causal when None and ``Tq > 1``."""
    if mask is None:
        tq = query.shape[-2]
        if tq == 1:
            return None
        q_pos = torch.arange(kv_len - tq, kv_len, device=query.device)
        causal = torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None]
        return causal[None, None].expand(query.shape[0], 1, tq, kv_len)
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask[..., -kv_len:].expand(query.shape[0], *mask.shape[1:3], kv_len)


def _decode(query: torch.Tensor, *args: Any) -> torch.Tensor:
    """The fused kernel when it covers this pair of stored formats, else the reference (on CUDA,
    with a warning once per pair naming the formats)."""
    kernel = fused_kernel(query)
    keys, values = args[0], args[1]
    if kernel is not None:
        if kernel.supports(keys, values):
            return kernel.fused_decode_attention(query, *args)
        pair = (type(keys).__name__, type(values).__name__)
        if pair not in _FUSED:
            _FUSED[pair] = True
            why = getattr(kernel, "unsupported_reason", lambda k, v: None)(keys, values)
            warnings.warn(
                f"kvpolar: the fused decode kernel does not read keys stored as {pair[0]} with values "
                f"stored as {pair[1]}{f' ({why})' if why else ''}; this cache decodes with the PyTorch "
                "reference (correct, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
    return reference_decode_attention(query, *args)


def fused_kernel(query: torch.Tensor) -> Any:
    """The fused decode-attention kernel module for CUDA queries, or None (CPU, or no Triton:
    then a one-time warning says why)."""
    if query.device.type != "cuda":
        return None
    if "module" not in _FUSED:
        try:
            import kvpolar.kernels.decode_attention as module

            if module.triton is None:
                raise ImportError("triton is not installed")
            _FUSED["module"] = module
        except Exception as err:  # ImportError, missing Triton
            warnings.warn(
                f"kvpolar: fused decode attention unavailable ({type(err).__name__}: {err}); "
                "using the PyTorch reference (correct, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
            _FUSED["module"] = None
    return _FUSED["module"]
