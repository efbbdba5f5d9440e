"""kvpolar: KV-cache quantization for LLM inference (polar-rope, polar-recursive, SQuat, KIVI)."""

from kvpolar.quantized import QuantizedTensor, cat
from kvpolar.quantizers import Quantizer
from kvpolar.registry import available_quantizers, quantizer, register

__version__ = "0.1.0"

__all__ = [
    "Quantizer",
    "QuantizedTensor",
    "available_quantizers",
    "cat",
    "quantizer",
    "register",
]
