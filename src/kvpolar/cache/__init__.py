"""The Hugging Face ``transformers`` integration: config (presets), cache, attention function.

``KVCacheConfig`` needs no ``transformers``; the other names import it on first use.
"""

from typing import Any

from kvpolar.cache.config import PRESETS, KVCacheConfig

_LAZY = {
    "QuantizedKVCache": "kvpolar.cache.cache",
    "MemoryReport": "kvpolar.cache.cache",
    "enable": "kvpolar.cache.cache",
    "cache_keyword": "kvpolar.cache.cache",
    "cache_kwargs": "kvpolar.cache.cache",
    "register_attention": "kvpolar.cache.attention",
    "generate_with_graphs": "kvpolar.cache.graphed",
    "decode_with_graphs": "kvpolar.cache.graphed",
    "GraphedDecoding": "kvpolar.cache.graphed",
    "replayed_decoding": "kvpolar.cache.replayed_generate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvpolar.cache' has no attribute {name!r}")


__all__ = [
    "GraphedDecoding", "KVCacheConfig", "MemoryReport", "PRESETS", "QuantizedKVCache", "cache_keyword", "cache_kwargs",
    "decode_with_graphs", "enable", "generate_with_graphs", "register_attention", "replayed_decoding",
]
