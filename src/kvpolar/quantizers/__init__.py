"""Quantization methods, one module each. Importing this package registers every built-in method."""

from kvpolar.quantizers import identity, kivi, polar_rope  # noqa: F401
from kvpolar.quantizers.base import Quantizer

__all__ = ["Quantizer"]
