"""Triton kernels. Each module holds a kernel, its launcher, and names its PyTorch reference.

Importing this package needs no Triton; kernel modules import it lazily so the library works on
machines without it (the PyTorch references run there).
"""

import functools


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here (the CUDA fast paths need it; the PyTorch references do not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
