"""Triton kernels. Each module holds a kernel, its launcher, and names its PyTorch reference.

Importing this package needs no Triton; kernel modules import it lazily so the library works on
machines without it (the PyTorch references run there).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kvpolar.quantized import QuantizedTensor


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here (the CUDA fast paths need it; the PyTorch references do not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=16)
def _capability_of(index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(index)


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability ``(major, minor)`` of a CUDA ``device`` (the current one where it has no
    index); None for any other device."""
    if device.type != "cuda":
        return None
    import torch

    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def interpreting() -> bool:
    """Whether Triton runs kernels under its CPU interpreter (``TRITON_INTERPRET=1``), where kernels
    take the arithmetic the interpreter gets right (e.g. no bfloat16 products, no inline PTX)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_dequantize_into(p: QuantizedTensor, out: torch.Tensor) -> bool:
    """On CUDA with Triton, :func:`kvpolar.kernels.dequantize.dequantize_into` (imported on first
    use) where a kernel reads ``p`` and writes ``out`` as it is laid out: True when it wrote, False
    (``out`` untouched) otherwise."""
    if not (out.is_cuda and triton_available()):
        return False
    from kvpolar.kernels.dequantize import write_if_taken

    return write_if_taken(p, out)
