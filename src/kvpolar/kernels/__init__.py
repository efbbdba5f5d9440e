"""Triton kernels. Each module holds a kernel, its launcher, and names its PyTorch reference.

Importing this package needs no Triton; kernel modules import it lazily so the library works on
machines without it (the PyTorch references run there).
"""
