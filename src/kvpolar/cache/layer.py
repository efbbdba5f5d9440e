"""One layer of the quantized cache: a packed part (oldest tokens) followed by a 16-bit residual window.

Token order is kept: packed tokens ``[0, Tk)`` then residual tokens ``[Tk, Tk + R)``, so the model's
attention mask (built for ``get_seq_length() + new tokens`` columns) lines up with both parts.

Residual policy: ``update`` appends new keys/values to the residual window; after attention has run
(``after_attention``, called by the ``"kvpolar"`` attention function) the oldest tokens beyond
``residual_length`` move to the packed part in whole chunks of ``chunk`` tokens (the least common
multiple of the key and value quantizers' token groups, e.g. KIVI's G = 32, and at least
``min_chunk`` tokens, ``KVCacheConfig.min_chunk``: per-token formats such as turbo would otherwise
re-quantize and re-concatenate every step). So the newest ``residual_length`` tokens are always 16-bit and at most ``chunk - 1``
more wait for their chunk to fill; prefill quantizes all complete chunks at once. A multi-token step
after the prompt (assisted / speculative decoding's verify step) keeps all its tokens 16-bit until the
next step, so rejected draft tokens can be cropped whatever the draft length
(``KVCacheConfig.max_rollback_tokens`` caps this, e.g. for a prefill in chunks). Values move in the same chunks as keys (KIVI's
code moves values token by token; one boundary for both keeps one attention layout).

Padding: tokens no query may attend to (left padding) are replaced, before quantizing, by the next
real token of the same row, so they never enter a real token's group statistics (min/max, norms,
SQuat's query subspace).

Replayed decode steps (``kvpolar.cache.graphed``, CUDA graphs): while ``window_buffers`` is set, the
window lies in buffers of a fixed size and ``update`` writes each new token at a position held on the
device; the host-side state (``seen``, the window, the moves into the packed part) stays as it was
until the decode loop hands the buffers back (``take_window_buffers``).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from kvpolar.cache.config import LayerPlan
from kvpolar.quantized import QuantizedTensor, cat
from kvpolar.quantizers.base import Quantizer
from kvpolar.quantizers.identity import FullPrecisionTensor
from kvpolar.registry import available_quantizers, quantizer

_PENDING = threading.local()  # (layer, key tensor returned by update) until the attention call


@dataclasses.dataclass
class WindowBuffers:
    """The 16-bit window in buffers of a fixed size, for decode steps recorded once and replayed.

    ``keys`` / ``values``: ``[B, Hkv, capacity, D]`` in the cache's dtype, the window's tokens first;
    ``index``: int64 ``[1]``, where ``update`` writes the step's token; ``length``: int32 ``[1]``, the
    tokens the step's attention reads (``index + 1``). The decode loop advances both on the device.
    ``packed_keys`` / ``packed_values`` and their quantizers: what the attention reads before the window
    (a quantized layer's packed part; a 16-bit layer's whole cache, stored as it is).
    ``attention_mask``: bool ``[B, 1, 1, packed + capacity]`` (True = attend) for a batch with padding,
    fixed for the stretch (the steps' own tokens are all real); None without padding."""

    keys: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    length: torch.Tensor
    packed_keys: QuantizedTensor | None = None
    packed_values: QuantizedTensor | None = None
    key_quantizer: Quantizer | None = None
    value_quantizer: Quantizer | None = None
    attention_mask: torch.Tensor | None = None


def check_registered(role: str, name: str) -> None:
    if name not in available_quantizers():
        raise ValueError(
            f"{role}_quantizer={name!r} is not registered in this kvpolar install; "
            f"available: {', '.join(available_quantizers())}"
        )


def build_quantizer(role: str, name: str, params: Any, head_dim: int) -> Quantizer:
    """The quantizer for ``role`` ("key"/"value"), with a clear error if it is not installed."""
    check_registered(role, name)
    q = quantizer(name, **dict(params))
    try:
        q.check_head_dim(head_dim)
    except ValueError as err:
        raise ValueError(f"{role}_quantizer={name!r} cannot store head_dim={head_dim}: {err}") from None
    return q


def token_group(q: Quantizer, head_dim: int) -> int:
    """Tokens per metadata row of ``q``'s stored form, found by quantizing a tiny probe."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(1, 1, 2, head_dim, generator=gen)
    context = {}
    if "queries" in q.context_keys:
        context["queries"] = torch.randn(1, 1, 8, head_dim, generator=gen)
    return int(q.quantize(probe, **context).token_group)


def take_pending(key: torch.Tensor) -> QuantizedLayer | None:
    """The layer whose ``update`` returned ``key`` just before this attention call, if any."""
    pending = getattr(_PENDING, "value", None)
    _PENDING.value = None
    if pending is not None and pending[1] is key:
        return pending[0]
    return None


class QuantizedLayer(CacheLayerMixin):
    """Cache of one attention layer. Shapes: keys/values ``[batch, kv_heads, tokens, head_dim]``."""

    is_compileable = False
    is_croppable = True  # the newest tokens sit in the 16-bit window (see crop)
    is_sliding = False
    supports_early_init = False

    def __init__(self, plan: LayerPlan, layer_idx: int, head_dim: int, residual_length: int,
                 min_chunk: int = 32, max_rollback_tokens: int | None = None) -> None:
        """``min_chunk``: fewest tokens per move into the packed part (``KVCacheConfig.min_chunk``). Each
        move quantizes the chunk and concatenates it to every stored tensor of the layer (a copy of its
        packed cache) and changes the packed tensors' strides, which the fused kernel is compiled for:
        moving one token per step made turbo and polar-recursive copy the whole cache every step and
        recompile (about 2 s) in several of the first steps on an H100 (benchmarks/README.md, "The
        other presets"). ``max_rollback_tokens``: most tokens of a multi-token step after the first kept
        16-bit until the next step (``KVCacheConfig.max_rollback_tokens``; None: all of them)."""
        super().__init__()
        self.plan, self.layer_idx, self.head_dim = plan, layer_idx, head_dim
        self.residual_length = residual_length
        self.max_rollback_tokens = max_rollback_tokens
        self.key_quantizer = self.value_quantizer = None
        self.chunk = 1
        check_registered("key", plan.key_quantizer)  # also for full-precision layers: a typo is an error
        check_registered("value", plan.value_quantizer)
        if not plan.full_precision:
            self.key_quantizer = build_quantizer("key", plan.key_quantizer, plan.key_params, head_dim)
            self.value_quantizer = build_quantizer("value", plan.value_quantizer, plan.value_params, head_dim)
            kg = token_group(self.key_quantizer, head_dim)
            vg = token_group(self.value_quantizer, head_dim)
            group = kg * vg // math.gcd(kg, vg)
            self.chunk = group * math.ceil(min_chunk / group)
        self._clear()

    def _clear(self) -> None:
        self.packed_keys: QuantizedTensor | None = None
        self.packed_values: QuantizedTensor | None = None
        self.keys = self.values = None  # the residual window (transformers' names)
        self.residual_valid: torch.Tensor | None = None  # bool [B, R]: False = padding; None: no padding
        self.key_context: dict[str, Any] | None = None  # SQuat: prompt queries or their subspace
        self.seen = 0
        self.awaiting_attention = False
        self.is_initialized = False
        self.window_buffers: WindowBuffers | None = None  # set for replayed decode steps

    # ----- CacheLayerMixin --------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[0], key_states.shape[1]  # local heads (TP)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append ``[B, Hkv, T, D]`` keys/values; full-precision layers return the whole cache,
        quantized layers return the new states and leave the rest to the ``"kvpolar"`` attention."""
        if self.awaiting_attention:
            raise RuntimeError(
                f"layer {self.layer_idx}: the previous forward never ran kvpolar's attention, so the cache "
                "was not compressed. A QuantizedKVCache needs attn_implementation='kvpolar': call "
                "kvpolar.enable(model, ...) or model.set_attn_implementation('kvpolar') after "
                "importing kvpolar.cache.cache"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_shape(key_states, value_states)
        if self.window_buffers is not None:
            return self._update_buffers(key_states, value_states)
        first = self.seen == 0
        self.keys = key_states if first else torch.cat([self.keys, key_states], dim=-2)
        self.values = value_states if first else torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        if self.plan.full_precision:  # (pending too: the attention then knows the cache is kvpolar's)
            _PENDING.value = (self, self.keys)
            return self.keys, self.values
        self.awaiting_attention = True
        _PENDING.value = (self, key_states)
        return key_states, value_states

    def _update_buffers(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """``update`` while the window lies in ``window_buffers``: the one new token written at the
        buffers' device-held position; nothing on the host changes."""
        if key_states.shape[-2] != 1:
            raise ValueError(f"layer {self.layer_idx}: replayed decode steps take one token per step; got "
                             f"{key_states.shape[-2]}")
        buffers = self.window_buffers
        buffers.keys.index_copy_(2, buffers.index, key_states)
        buffers.values.index_copy_(2, buffers.index, value_states)
        self.awaiting_attention = True
        _PENDING.value = (self, key_states)
        return key_states, value_states

    def give_window_buffers(self, capacity: int, index: torch.Tensor, length: torch.Tensor,
                            attention_mask: torch.Tensor | None = None) -> WindowBuffers:
        """Move the window into buffers of ``capacity`` tokens (``window_buffers``) for replayed decode
        steps, with the device-held ``index`` / ``length`` it shares with the layers of its kind. A
        quantized layer's buffers start with its window, after its packed part; a 16-bit layer's start
        empty, after its whole cache (read in place as ``FullPrecisionTensor``s). ``attention_mask``
        (a batch with padding): bool ``[B, 1, 1, N]``, True = attend, over the ``N`` = packed part
        (a 16-bit layer: its whole cache) + ``capacity`` columns the steps' attention reads."""
        if self.keys is None:
            raise ValueError(f"layer {self.layer_idx}: the layer holds no tokens; fill it before replayed decoding")
        w = 0 if self.plan.full_precision else self.residual_tokens
        if capacity < w + 1:
            raise ValueError(f"layer {self.layer_idx}: capacity={capacity}; the window holds {w} tokens and "
                             "needs room for one more")
        columns = self.seen - w + capacity
        if attention_mask is not None and (attention_mask.dtype != torch.bool
                                           or tuple(attention_mask.shape) != (self.batch_size, 1, 1, columns)):
            raise ValueError(f"layer {self.layer_idx}: attention_mask must be bool [{self.batch_size}, 1, 1, "
                             f"{columns}]; got {attention_mask.dtype} {tuple(attention_mask.shape)}")
        shape = (self.batch_size, self.num_heads, capacity, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.plan.full_precision:
            identity = quantizer("none")
            packed = [FullPrecisionTensor(shape=t.shape, dtype=t.dtype, values=t) for t in (self.keys, self.values)]
            self.window_buffers = WindowBuffers(keys, values, index, length, *packed, identity, identity,
                                                attention_mask)
        else:
            keys[:, :, :w], values[:, :, :w] = self.keys, self.values
            self.window_buffers = WindowBuffers(keys, values, index, length, self.packed_keys, self.packed_values,
                                                self.key_quantizer, self.value_quantizer, attention_mask)
        return self.window_buffers

    def take_window_buffers(self, steps: int) -> None:
        """Back from ``window_buffers`` after ``steps`` replayed one-token steps: ``seen`` counts the
        steps; a quantized layer's window is the buffers' first tokens again and whole chunks beyond
        ``residual_length`` move into the packed part, as ``after_attention`` would have moved them (a
        window with padding flags counts the steps' tokens as real); a 16-bit layer appends the steps'
        tokens to its cache."""
        buffers, self.window_buffers = self.window_buffers, None
        self.seen += steps
        self.awaiting_attention = False
        if self.plan.full_precision:
            self.keys = torch.cat([self.keys, buffers.keys[:, :, :steps]], dim=-2)
            self.values = torch.cat([self.values, buffers.values[:, :, :steps]], dim=-2)
            return
        w = self.residual_tokens + steps
        self.keys = buffers.keys[:, :, :w].clone()
        self.values = buffers.values[:, :, :w].clone()
        self._record_valid(None, steps)  # (the steps' tokens are all real)
        move = (w - self.residual_length) // self.chunk * self.chunk
        if move > 0:
            self._compress(move)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``b`` becomes old row ``beam_idx[b]`` (int64 ``[B]``)."""
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each sequence repeated ``repeats`` times in place (``[a, b]`` -> ``[a, a, b, b]``)."""
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats={repeats!r}; expected a positive integer")
        if self.is_initialized:
            self._select_rows(torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep sequences ``indices`` (int64 ``[N]``), in that order."""
        self._select_rows(indices)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens: ``crop(-n)`` removes ``n`` (how assisted / speculative decoding
        rolls back rejected draft tokens), ``crop(n)`` with ``n > 0`` keeps the first ``n`` tokens
        (transformers' older form). Quantized layers can only drop tokens still in the 16-bit window:
        the window keeps at least ``residual_length`` tokens after every step, and after a
        multi-token step following the prompt (a draft's verify step) all of that step's tokens
        until the next one (at most ``max_rollback_tokens`` of them, if set), so a rejected draft of
        any length rolls back.

        Raises:
            ValueError: the tokens to drop reach into the packed part.
        """
        drop = max(self.seen - tokens_to_remove, 0) if tokens_to_remove > 0 else -tokens_to_remove
        if drop == 0 or not self.is_initialized or self.seen == 0:
            return
        drop = min(drop, self.seen)
        if drop > self.residual_tokens:
            cap = self.max_rollback_tokens
            rollback = "all of it: max_rollback_tokens=None" if cap is None else f"at most max_rollback_tokens={cap}"
            raise ValueError(
                f"layer {self.layer_idx}: cannot remove the newest {drop} tokens: only {self.residual_tokens} are "
                f"still in the 16-bit window, the rest are quantized (the window holds the last "
                f"{self.residual_length} tokens, residual_length, or the latest step if longer, "
                f"{rollback})"
            )
        if drop == self.seen:  # nothing packed: as if no token had been seen (SQuat's prompt subspace too)
            self._clear()
            return
        keep = self.residual_tokens - drop
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]
        if self.residual_valid is not None:
            self.residual_valid = self.residual_valid[:, :keep]
        self.seen -= drop

    def offload(self) -> None:
        self._refuse("offloading")

    def prefetch(self) -> None:
        self._refuse("offloading")

    # ----- called by the attention function ----------------------------------------------------
    @property
    def residual_tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def dequantized(self, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every cached token of sequences ``rows``, ``[rows, Hkv, seen, D]`` in the
        cache's dtype: the packed part dequantized (``Quantizer.dequantize_into``: on CUDA a Triton
        kernel where one reads the format), then the 16-bit window, in one buffer. A transient 16-bit
        copy, for steps too long for the fused kernel (``kvpolar.cache.attention``)."""
        window = (None, None) if self.keys is None else (self.keys[rows], self.values[rows])
        if self.packed_keys is None:
            return window
        packed_keys, packed_values = self.packed_keys, self.packed_values
        if rows != slice(None):
            index = torch.arange(self.batch_size, device=self.device)[rows]
            packed_keys, packed_values = packed_keys.select_batch(index), packed_values.select_batch(index)
        packed = packed_keys.num_tokens
        shape = (packed_keys.shape[0], self.num_heads, self.seen, self.head_dim)
        out = []
        for quantizer, stored, recent in ((self.key_quantizer, packed_keys, window[0]),
                                          (self.value_quantizer, packed_values, window[1])):
            full = torch.empty(shape, dtype=self.dtype, device=self.device)
            quantizer.dequantize_into(stored, full[..., :packed, :])  # a Triton kernel on CUDA where one reads it
            if recent is not None:
                full[..., packed:, :] = recent
            out.append(full)
        return out[0], out[1]

    def _record_valid(self, new_valid: torch.Tensor | None, t_new: int) -> None:
        """The window's padding flags (``residual_valid``) extended by its last ``t_new`` tokens, which
        ``new_valid`` (bool ``[B, t_new]``; None: all real) marks; left None while no padding came."""
        if new_valid is None and self.residual_valid is None:
            return
        if new_valid is None:
            new_valid = torch.ones(self.batch_size, t_new, dtype=torch.bool, device=self.device)
        old = self.residual_valid
        if old is None or old.shape[-1] != self.residual_tokens - t_new:
            old = torch.ones(self.batch_size, self.residual_tokens - t_new, dtype=torch.bool, device=self.device)
        self.residual_valid = torch.cat([old, new_valid.to(self.device)], dim=-1)

    def after_attention(self, new_valid: torch.Tensor | None, query: torch.Tensor) -> None:
        """Record which new tokens are real (``new_valid`` bool ``[B, T_new]``; None: all of them),
        keep SQuat's prompt queries, then move whole chunks beyond the residual window into the
        packed part. Until a batch brings padding the window's flags stay None: no per-step
        allocation, and no check of the flags on the host when a chunk moves."""
        self.awaiting_attention = False
        t_new = query.shape[-2]
        self._record_valid(new_valid, t_new)
        if self.key_context is None and "queries" in self.key_quantizer.context_keys:
            self.key_context = self._prompt_context(_fill_padding(query, new_valid, axis=-2))
        keep = self.residual_length
        if 1 < t_new < self.seen:  # a multi-token step after the prompt (a draft's verify step): its
            # tokens stay 16-bit until the next step (at most max_rollback_tokens), so crop can drop them
            cap = self.max_rollback_tokens
            keep = max(keep, t_new if cap is None else min(t_new, cap))
        move = (self.residual_tokens - keep) // self.chunk * self.chunk
        if move > 0:
            self._compress(move)

    def _compress(self, move: int) -> None:
        valid = None if self.residual_valid is None else self.residual_valid[:, :move]
        keys = _fill_padding(self.keys[..., :move, :], valid, axis=-2)
        values = _fill_padding(self.values[..., :move, :], valid, axis=-2)
        pk = self.key_quantizer.quantize(keys, **(self.key_context or {}))
        pv = self.value_quantizer.quantize(values)
        self.packed_keys = pk if self.packed_keys is None else cat([self.packed_keys, pk])
        self.packed_values = pv if self.packed_values is None else cat([self.packed_values, pv])
        # copies, not views: a view would keep the whole 16-bit prompt buffer alive
        self.keys = self.keys[..., move:, :].clone()
        self.values = self.values[..., move:, :].clone()
        if self.residual_valid is not None:
            self.residual_valid = self.residual_valid[:, move:]

    def _prompt_context(self, queries: torch.Tensor) -> dict[str, Any]:
        """What the key quantizer keeps from the prompt's queries ``[B, Hq, Tq, D]`` (GQA-stacked):
        the prepared subspace when it offers ``prepare`` (SQuat), else the queries themselves."""
        prepare = getattr(self.key_quantizer, "prepare", None)
        if "subspace" in self.key_quantizer.context_keys and callable(prepare):
            return {"subspace": prepare(queries, kv_heads=self.num_heads)}
        return {"queries": queries}

    def context_nbytes(self) -> dict[str, int]:
        """Bytes of what the layer keeps from the prompt for its key quantizer, by context name."""
        return {name: _nbytes(v) for name, v in (self.key_context or {}).items()}

    # ----- helpers -----------------------------------------------------------------------------
    def _check_shape(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        expected = (self.batch_size, self.num_heads, self.head_dim)
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            got = (t.shape[0], t.shape[1], t.shape[-1])
            if t.dim() != 4 or got != expected:
                raise ValueError(
                    f"layer {self.layer_idx}: {name} has shape {tuple(t.shape)}; this cache holds "
                    f"[batch={expected[0]}, kv_heads={expected[1]}, tokens, head_dim={expected[2]}]. "
                    "A cache serves one model and one batch: call cache.reset() or build a new one"
                )

    def _select_rows(self, index: torch.Tensor) -> None:
        """Every per-sequence tensor of the layer (window, flags, packed parts, the key quantizer's
        prompt context) restricted to rows ``index`` of the batch, in that order."""
        if not self.is_initialized:
            return
        if index.dim() != 1:
            raise ValueError(f"index: expected a 1-D tensor of batch rows, got shape {tuple(index.shape)}")
        index = index.to(self.device)
        if self.keys is not None:
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        if self.residual_valid is not None:
            self.residual_valid = self.residual_valid.index_select(0, index)
        if self.packed_keys is not None:
            self.packed_keys = self.packed_keys.select_batch(index)
            self.packed_values = self.packed_values.select_batch(index)
        if self.key_context is not None:
            self.key_context = {name: _rows_of(v, index, self.batch_size) for name, v in self.key_context.items()}
        self.batch_size = int(index.numel())

    def _refuse(self, what: str) -> None:
        if self.seen:
            raise NotImplementedError(f"kvpolar's QuantizedKVCache does not support {what}")


def _nbytes(obj: Any) -> int:
    """Bytes of every tensor inside ``obj`` (tensors, sequences of them, dataclasses holding them)."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if dataclasses.is_dataclass(obj):
        return sum(_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def _rows_of(obj: Any, index: torch.Tensor, batch: int) -> Any:
    """``obj`` (a tensor, a sequence or a dataclass of them, e.g. SQuat's prompt subspace) with every
    tensor whose leading axis is the batch (``batch`` rows) restricted to rows ``index``."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, index.to(obj.device)) if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rows_of(v, index, batch) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _rows_of(getattr(obj, f.name), index, batch)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _fill_padding(x: torch.Tensor, valid: torch.Tensor | None, axis: int) -> torch.Tensor:
    """``x`` ``[B, H, T, D]`` with each padding token (``valid[b, t]`` False) replaced by the next
    real token of its row (the previous one if none follows); rows with no real token stay as is."""
    if valid is None or bool(valid.all()):
        return x
    t = valid.shape[-1]
    pos = torch.arange(t, device=valid.device).expand_as(valid)
    big = torch.full_like(pos, t)
    nxt = torch.where(valid, pos, big).flip(-1).cummin(-1).values.flip(-1)
    prv = torch.where(valid, pos, -torch.ones_like(pos)).cummax(-1).values
    idx = torch.where(nxt < t, nxt, torch.where(prv >= 0, prv, pos))
    index = idx[:, None, :, None].expand(x.shape[0], x.shape[1], t, x.shape[-1]).to(x.device)
    return x.gather(axis, index)
