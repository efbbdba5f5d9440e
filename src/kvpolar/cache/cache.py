"""``QuantizedKVCache``: a ``transformers`` Cache storing keys/values with kvpolar quantizers.

Use it with the ``"kvpolar"`` attention implementation (``kvpolar.enable(model, preset)`` sets it),
which computes decode attention from the packed cache without dequantizing it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvpolar.cache.attention import register_attention
from kvpolar.cache.config import KVCacheConfig
from kvpolar.cache.layer import QuantizedLayer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
_PAYLOAD_FIELDS = ("codes", "values")  # stored fields counted as codes; every other field is metadata


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes held by a cache (this rank's, or summed over ranks with ``total_over_ranks=True``).

    ``packed_codes`` + ``metadata`` (per-field breakdown in ``metadata_fields``: scales, minimums,
    norms, stored codebooks, and what a layer keeps from the prompt for its key quantizer, e.g.
    ``key.subspace`` for SQuat) + ``residual`` (16-bit window of quantized layers) + ``shared``
    (rotations and other layer-wide objects) + ``full_precision_layers`` = ``total``.
    ``fp16_bytes`` is a 16-bit cache of the same tokens; ``compression_ratio = fp16_bytes / total``.
    """

    tokens: int
    packed_codes: int
    metadata: int
    metadata_fields: dict[str, int]
    residual: int
    shared: int
    full_precision_layers: int
    total: int
    fp16_bytes: int
    compression_ratio: float

    @property
    def bits_per_element(self) -> float:
        """Average stored bits per key/value element (16.0 for a 16-bit cache)."""
        return 16.0 * self.total / self.fp16_bytes if self.fp16_bytes else 0.0


class QuantizedKVCache(Cache):
    """A KV cache for ``model.generate(ids, **cache_kwargs(model, cache))`` with quantized keys/values.

    Args:
        model_config: the model's ``PretrainedConfig`` (Llama, Mistral, Qwen2, Qwen3 families).
        cache_config: a :class:`KVCacheConfig` or a preset name (``KVCacheConfig.preset``).

    Each layer sizes itself from the first key states it sees (batch, local KV heads under tensor
    parallelism); head dim and layer count come from ``model_config`` and are checked then.
    A cache holds one batch of sequences: build a new one (or ``reset()``) per ``generate`` call.
    """

    def __init__(self, model_config: Any, cache_config: KVCacheConfig | str = "kivi-2") -> None:
        if isinstance(cache_config, str):
            cache_config = KVCacheConfig.preset(cache_config)
        if not isinstance(cache_config, KVCacheConfig):
            raise TypeError(f"cache_config must be a KVCacheConfig or a preset name; got {type(cache_config).__name__}")
        text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
        model_type = getattr(text, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not supported; allowed: {', '.join(SUPPORTED_MODEL_TYPES)}")
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        bad = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
        if bad:
            raise ValueError(f"attention layer types {bad} are not supported; allowed: {SUPPORTED_LAYER_TYPES}")
        self.cache_config = cache_config
        self.model_type = model_type
        self.num_layers = int(text.num_hidden_layers)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        layers = [
            QuantizedLayer(cache_config.plan(i, self.num_layers), i, self.head_dim, cache_config.residual_length,
                           cache_config.min_chunk, cache_config.max_rollback_tokens)
            for i in range(self.num_layers)
        ]
        for layer in layers:
            layer.num_model_layers = self.num_layers
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(
                f"layer_idx={layer_idx} is outside this cache's {self.num_layers} layers: the cache was "
                f"built for another model ({self.model_type}, {self.num_layers} layers)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def memory_report(self, total_over_ranks: bool = False) -> MemoryReport:
        """Bytes held now, by kind; ``total_over_ranks`` sums over ``torch.distributed`` ranks (one all-reduce)."""
        codes = meta = residual = shared = full = fp16 = 0
        fields: dict[str, int] = {}
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            elems = layer.batch_size * layer.num_heads * layer.seen * layer.head_dim * 2
            fp16 += elems * 2
            if layer.plan.full_precision:
                full += layer.keys.nbytes + layer.values.nbytes
                continue
            residual += 0 if layer.keys is None else layer.keys.nbytes + layer.values.nbytes
            shared += layer.key_quantizer.shared_nbytes(layer.head_dim)
            shared += layer.value_quantizer.shared_nbytes(layer.head_dim)
            for name, nbytes in layer.context_nbytes().items():  # per head, like metadata
                meta += nbytes
                fields[f"key.{name}"] = fields.get(f"key.{name}", 0) + nbytes
            for role, packed in (("key", layer.packed_keys), ("value", layer.packed_values)):
                for name, t in ({} if packed is None else packed.stored_tensors()).items():
                    if name in _PAYLOAD_FIELDS:
                        codes += t.nbytes
                    else:
                        meta += t.nbytes
                        fields[f"{role}.{name}"] = fields.get(f"{role}.{name}", 0) + t.nbytes
        tokens = self.get_seq_length()
        if total_over_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            names = sorted(fields)
            device = next((l.device for l in self.layers if l.is_initialized), torch.device("cpu"))
            if torch.distributed.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            vec = torch.tensor([codes, meta, residual, shared, full, fp16, *(fields[n] for n in names)],
                               dtype=torch.float64, device=device)
            torch.distributed.all_reduce(vec)
            codes, meta, residual, shared, full, fp16, *rest = (int(v) for v in vec.tolist())
            fields = dict(zip(names, rest))
        total = codes + meta + residual + shared + full
        return MemoryReport(
            tokens=tokens, packed_codes=codes, metadata=meta, metadata_fields=fields, residual=residual,
            shared=shared, full_precision_layers=full, total=total, fp16_bytes=fp16,
            compression_ratio=fp16 / total if total else 0.0,
        )

    def __repr__(self) -> str:
        c = self.cache_config
        return (
            f"QuantizedKVCache(keys={c.key_quantizer}{dict(c.key_params)}, values={c.value_quantizer}"
            f"{dict(c.value_params)}, residual_length={c.residual_length}, layers={self.num_layers}, "
            f"tokens={self.get_seq_length()})"
        )


def enable(model: Any, cache_config: KVCacheConfig | str = "kivi-2", **changes: Any) -> QuantizedKVCache:
    """Switch ``model`` to kvpolar attention and return a fresh cache for one ``generate`` call.

    ``cache = kvpolar.enable(model, "polar-rope-3"); model.generate(ids, **kvpolar.cache_kwargs(model, cache))``
    (or name the keyword yourself: ``cache=cache`` from transformers 5.24 on, ``past_key_values=cache``
    before).
    ``changes`` replace fields of the config, e.g. ``enable(model, "kivi-2", residual_length=32)``.
    The model keeps ``attn_implementation="kvpolar"`` (which behaves as ``sdpa`` without a kvpolar
    cache); for the next batch build ``kvpolar.QuantizedKVCache(model.config, ...)`` or reuse the
    same config with ``enable`` again.
    """
    if isinstance(cache_config, str):
        cache_config = KVCacheConfig.preset(cache_config)
    if changes:
        cache_config = dataclasses.replace(cache_config, **changes)
    cache = QuantizedKVCache(model.config, cache_config)
    model.set_attn_implementation("kvpolar")
    return cache


def cache_keyword(model: Any) -> str:
    """The keyword under which ``model``'s ``forward`` / ``generate`` take a cache: ``"cache"`` from
    transformers 5.24 on (which deprecates ``"past_key_values"``), ``"past_key_values"`` before."""
    forward = getattr(model, "forward", None)
    if forward is None:
        raise TypeError(f"model: expected a transformers model with a forward method, got {type(model).__name__}")
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # no introspectable signature: the name every 5.x release accepts
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Cache) -> dict[str, Cache]:
    """``{keyword: cache}`` for ``model(..., **cache_kwargs(model, cache))`` and ``model.generate``,
    with the keyword the installed transformers expects (:func:`cache_keyword`), so no deprecation
    warning and no break when the old name is removed."""
    return {cache_keyword(model): cache}


register_attention()  # attn_implementation='kvpolar' exists once the cache is importable
