"""Quantization methods, one module each. Importing this package registers every built-in method."""

from kvpolar.quantizers import identity, kivi  # noqa: F401
from kvpolar.quantizers import squat  # noqa: F401
from kvpolar.quantizers import fp8  # noqa: F401
from kvpolar.quantizers import polar_recursive  # noqa: F401
from kvpolar.quantizers import turbo  # noqa: F401
from kvpolar.quantizers import identity, kivi, polar_rope  # noqa: F401
from kvpolar.quantizers.base import Quantizer

__all__ = ["Quantizer"]
