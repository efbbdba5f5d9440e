"""What an evaluation runs per preset: a cache factory, and the quantizers for attention fidelity.

``"fp16"`` is the baseline: the stock ``transformers.DynamicCache`` (16-bit, or the model's dtype).
Any other name is a ``kvpolar.cache`` preset (``KVCacheConfig.preset``), run through
``kvpolar.enable(model, name)``, which also switches the model to the kvpolar attention function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from kvpolar.quantizers.base import Quantizer

BASELINE = "fp16"

#: ``make_cache(model) -> transformers Cache`` (None: let the model build its default DynamicCache).
CacheFactory = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class EvalPreset:
    """One column of an evaluation.

    Attributes:
        name: shown in tables and plots.
        make_cache: builds a fresh cache for one sequence batch (called per window / prompt).
        key_quantizer, value_quantizer: the quantizers the preset stores keys/values with (attention
            fidelity applies them directly to captured keys/values); None for the baseline.
        method: label grouping presets into one curve on the perplexity-vs-bits plot.
    """

    name: str
    make_cache: CacheFactory
    key_quantizer: Quantizer | None = None
    value_quantizer: Quantizer | None = None
    method: str = ""

    @property
    def is_baseline(self) -> bool:
        return self.key_quantizer is None and self.value_quantizer is None


def baseline_preset() -> EvalPreset:
    from transformers import DynamicCache

    return EvalPreset(BASELINE, lambda model: DynamicCache(config=model.config), method=BASELINE)


def kvpolar_preset(name: str, **changes: Any) -> EvalPreset:
    """A ``kvpolar.cache`` preset, with ``changes`` to its config fields (e.g. ``residual_length``);
    ValueError naming the known presets when ``name`` is unknown."""
    try:
        from kvpolar.cache import KVCacheConfig, enable
    except ImportError:  # the transformers integration is not installed / not on this branch
        raise ValueError(f"unknown preset {name!r}; available: {available_presets()}") from None
    from kvpolar.registry import quantizer

    config = KVCacheConfig.preset(name)  # raises ValueError listing the presets
    if changes:
        config = dataclasses.replace(config, **changes)
    return EvalPreset(
        name,
        lambda model: enable(model, config),
        key_quantizer=quantizer(config.key_quantizer, **dict(config.key_params)),
        value_quantizer=quantizer(config.value_quantizer, **dict(config.value_params)),
        method=config.key_quantizer,
    )


def available_presets() -> list[str]:
    """``"fp16"`` and every ``kvpolar.cache`` preset installed."""
    try:
        from kvpolar.cache import PRESETS
    except ImportError:
        return [BASELINE]
    return [BASELINE, *sorted(PRESETS)]


def resolve_presets(presets: Sequence[str | EvalPreset], residual_length: int | None = None) -> list[EvalPreset]:
    """Names or ready :class:`EvalPreset` objects -> presets, the baseline first (added if absent);
    ``residual_length`` (None: each preset's own) replaces the window of presets given by name."""
    changes = {} if residual_length is None else {"residual_length": residual_length}
    if isinstance(presets, str):
        presets = [p.strip() for p in presets.split(",") if p.strip()]
    out = [baseline_preset()]
    for p in presets:
        if isinstance(p, EvalPreset):
            out.append(p)
        elif p != BASELINE:
            out.append(kvpolar_preset(p, **changes))
    names = [p.name for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"presets {dupes} are given more than once")
    return out


def reset_attention(model: Any) -> None:
    """Put the model back on ``sdpa`` after a kvpolar preset switched its attention function."""
    if getattr(model.config, "_attn_implementation", None) not in (None, "sdpa", "eager"):
        model.set_attn_implementation("sdpa")
