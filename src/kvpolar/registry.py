"""Quantizers by name: ``quantizer(name, **params)`` and ``available_quantizers()``."""

from __future__ import annotations

from typing import Any, TypeVar

from kvpolar.quantizers.base import Quantizer

_REGISTRY: dict[str, type[Quantizer]] = {}

_Q = TypeVar("_Q", bound=type[Quantizer])


def register(cls: _Q) -> _Q:
    """Class decorator adding a Quantizer subclass under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a quantizer named {name!r} is already registered ({_REGISTRY[name]})")
    _REGISTRY[name] = cls
    return cls


def available_quantizers() -> list[str]:
    """Names accepted by :func:`quantizer`, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def quantizer(name: str, **params: Any) -> Quantizer:
    """Build the quantizer registered as ``name`` with ``params``.

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones) or a bad parameter value.
        TypeError: a parameter the method does not take.
    """
    _load_builtin()
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown quantizer {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None
    return cls(**params)


def _load_builtin() -> None:
    import kvpolar.quantizers  # noqa: F401  (importing registers every built-in method)
