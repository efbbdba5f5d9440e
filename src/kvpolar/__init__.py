"""kvpolar: KV-cache quantization for LLM inference (polar-rope, polar-recursive, SQuat, KIVI)."""

from typing import Any

from kvpolar.quantized import QuantizedTensor, cat
from kvpolar.quantizers import Quantizer
from kvpolar.registry import available_quantizers, quantizer, register

__version__ = "0.1.0"

# The transformers integration loads on first use, so `import kvpolar` works without transformers.
_CACHE_NAMES = {
    "KVCacheConfig": "kvpolar.cache.config",
    **dict.fromkeys(("QuantizedKVCache", "enable", "cache_kwargs", "cache_keyword"), "kvpolar.cache.cache"),
    "generate_with_graphs": "kvpolar.cache.graphed",
    "replayed_decoding": "kvpolar.cache.replayed_generate",
}


def __getattr__(name: str) -> Any:
    if name in _CACHE_NAMES:
        import importlib

        return getattr(importlib.import_module(_CACHE_NAMES[name]), name)
    raise AttributeError(f"module 'kvpolar' has no attribute {name!r}")


__all__ = [
    "KVCacheConfig",
    "QuantizedKVCache",
    "Quantizer",
    "QuantizedTensor",
    "available_quantizers",
    "cache_keyword",
    "cache_kwargs",
    "cat",
    "enable",
    "generate_with_graphs",
    "quantizer",
    "register",
    "replayed_decoding",
]
