"""Quantization methods, one module each. Importing this package registers every built-in method."""

from kvpolar.quantizers import fp8, identity, kivi, polar_recursive, polar_rope, squat, turbo  # noqa: F401
from kvpolar.quantizers.base import Quantizer

__all__ = ["Quantizer"]
