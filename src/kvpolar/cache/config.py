"""``KVCacheConfig``: which quantizer stores keys and values, the residual window, per-layer policy.

Presets are named instances (``KVCacheConfig.preset("kivi-2")``). Group sizes follow the papers'
runs: KIVI keys and values G = 32 (values group channels, so head dims must be a multiple of 32),
polar-rope G = 128, SQuat G = 32. A preset may name a method that is not registered in this install;
building a cache from it raises a ``ValueError`` naming the missing quantizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kvpolar.validation import allowed

#: ``full_precision_layers`` shorthands: name -> (first n layers, last n layers).
LAYER_SHORTHANDS = {"boundary-2": 2}
_OVERRIDE_KEYS = ("key_quantizer", "key_params", "value_quantizer", "value_params")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one layer stores: ``full_precision`` layers keep 16-bit keys/values like ``DynamicCache``."""

    full_precision: bool
    key_quantizer: str
    key_params: Mapping[str, Any]
    value_quantizer: str
    value_params: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    """How a :class:`~kvpolar.QuantizedKVCache` stores each layer.

    Attributes:
        key_quantizer, key_params: registered quantizer name and its parameters for keys.
        value_quantizer, value_params: the same for values.
        residual_length: the newest ``residual_length`` tokens always stay in 16 bits; older tokens
            are quantized in whole chunks: the key and value quantizers' token groups, at least
            ``min_chunk`` tokens (see ``cache/layer.py``).
        min_chunk: fewest tokens moved into the packed part at a time (default 32: per-token formats
            such as turbo would otherwise re-quantize, re-concatenate and change the packed tensors'
            strides every step). 1 moves them token by token.
        max_rollback_tokens: how many tokens of a multi-token step after the first (a draft's verify
            step in assisted decoding, or a chunk of a chunked prefill) stay 16-bit until the next
            step beyond ``residual_length``, so that ``crop`` can remove them. None (default): the
            whole step, so a rejected draft of any length rolls back. An int caps it: a prefill in
            chunks (e.g. transformers' ``prefill_chunk_size``) otherwise holds its last chunk in 16
            bits, in every layer, until the first decode step; with 0 only the newest
            ``residual_length`` tokens can be cropped.
        full_precision_layers: layer indices kept entirely in 16 bits (negative counts from the end),
            or ``"boundary-2"``: the first and last two layers.
        layer_overrides: ``{layer index: {"key_quantizer"|"key_params"|"value_quantizer"|
            "value_params": value}}``, replacing those fields for that layer (negative allowed).
    """

    key_quantizer: str = "kivi"
    key_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    value_quantizer: str = "kivi"
    value_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    residual_length: int = 128
    min_chunk: int = 32
    max_rollback_tokens: int | None = None
    full_precision_layers: tuple[int, ...] | str = ()
    layer_overrides: Mapping[int, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("key_quantizer", "value_quantizer"):
            if not isinstance(getattr(self, name), str):
                raise allowed(name, getattr(self, name), "a registered quantizer name (str)")
        r = self.residual_length
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise allowed("residual_length", r, "an integer >= 0")
        c = self.min_chunk
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise allowed("min_chunk", c, "an integer >= 1")
        m = self.max_rollback_tokens
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 0):
            raise allowed("max_rollback_tokens", m, "None (a whole step) or an integer >= 0")
        fpl = self.full_precision_layers
        if isinstance(fpl, str):
            if fpl not in LAYER_SHORTHANDS:
                raise allowed("full_precision_layers", fpl, [*LAYER_SHORTHANDS, "a tuple of layer indices"])
        else:
            fpl = tuple(fpl)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in fpl):
                raise allowed("full_precision_layers", fpl, "layer indices (int) or 'boundary-2'")
            object.__setattr__(self, "full_precision_layers", fpl)
        for layer, override in self.layer_overrides.items():
            bad = sorted(set(override) - set(_OVERRIDE_KEYS))
            if not isinstance(layer, int) or bad:
                raise allowed(f"layer_overrides[{layer!r}]", dict(override), f"keys among {_OVERRIDE_KEYS}")

    @staticmethod
    def preset(name: str) -> KVCacheConfig:
        """The named preset; ``ValueError`` listing the presets for an unknown name."""
        try:
            return PRESETS[name]
        except (KeyError, TypeError):
            raise allowed("preset", name, sorted(PRESETS)) from None

    def plan(self, layer_idx: int, num_layers: int) -> LayerPlan:
        """The storage of layer ``layer_idx`` in a model of ``num_layers`` layers."""
        fields = {k: getattr(self, k) for k in _OVERRIDE_KEYS}
        for layer, override in self.layer_overrides.items():
            if layer % num_layers == layer_idx:
                fields.update(override)
        return LayerPlan(full_precision=layer_idx in self.full_precision_indices(num_layers), **fields)

    def full_precision_indices(self, num_layers: int) -> frozenset[int]:
        """``full_precision_layers`` resolved to non-negative indices; out-of-range is an error."""
        fpl = self.full_precision_layers
        if isinstance(fpl, str):
            n = LAYER_SHORTHANDS[fpl]
            return frozenset(range(min(n, num_layers))) | frozenset(range(max(num_layers - n, 0), num_layers))
        for i in fpl:
            if not -num_layers <= i < num_layers:
                raise allowed("full_precision_layers", fpl, f"indices in [-{num_layers}, {num_layers})")
        return frozenset(i % num_layers for i in fpl)


def _kivi(bits: int, axis: str, group_size: int = 32) -> dict[str, Any]:
    return {"bits": bits, "group_size": group_size, "axis": axis}


def _preset(key: str, key_params: dict, value: str, value_params: dict, **kw: Any) -> KVCacheConfig:
    return KVCacheConfig(key, key_params, value, value_params, **kw)


PRESETS: dict[str, KVCacheConfig] = {
    # the plumbing with no loss: identity quantizers through the packed path (tests use it)
    "none": _preset("none", {}, "none", {}),
    "kivi-2": _preset("kivi", _kivi(2, "channel"), "kivi", _kivi(2, "token")),
    "kivi-4": _preset("kivi", _kivi(4, "channel"), "kivi", _kivi(4, "token")),
    "kivi-8": _preset("kivi", _kivi(8, "channel"), "kivi", _kivi(8, "token")),
    "polar-rope-3": _preset(
        "polar-rope", {"radius_bits": 2, "angle_bits": 4, "group_size": 128}, "kivi", _kivi(2, "token")
    ),
    "polar-rope-4": _preset(
        "polar-rope", {"radius_bits": 4, "angle_bits": 4, "group_size": 128}, "kivi", _kivi(4, "token")
    ),
    "polar-recursive": _preset("polar-recursive", {}, "polar-recursive", {}),
    # block_size 32: 2 blocks at head dim 64, 4 at 128 (one block would reduce SQuat to KIVI)
    "squat-2": _preset("squat", {"bits": 2, "group_size": 32, "block_size": 32}, "kivi", _kivi(2, "token")),
    "turbo-3": _preset("turbo", {"bits": 3}, "kivi", _kivi(3, "token"), full_precision_layers="boundary-2"),
    "turbo-4": _preset("turbo", {"bits": 4}, "kivi", _kivi(4, "token")),
    "turbo-k3v4": _preset(
        "turbo", {"bits": 3}, "kivi", _kivi(4, "token"), full_precision_layers="boundary-2"
    ),
    "fp8": _preset("fp8", {"format": "e4m3", "scale": "head"}, "fp8", {"format": "e4m3", "scale": "head"}),
}
