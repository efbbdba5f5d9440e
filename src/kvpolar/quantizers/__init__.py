"""Quantization methods, one module each. Importing this package registers every built-in method."""

from kvpolar.quantizers import identity, kivi  # noqa: F401
from kvpolar.quantizers import polar_recursive  # noqa: F401
from kvpolar.quantizers import turbo  # noqa: F401
from kvpolar.quantizers.base import Quantizer

__all__ = ["Quantizer"]
