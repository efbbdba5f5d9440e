"""Every load and store of a kernel run by Triton's interpreter checked against the storages of the
kernel's tensor arguments: an address outside all of them (a read past a tensor's end, a wrong stride)
raises ``OutOfBounds`` naming the kernel and the address. On a GPU such an access reads whatever lies
there, or faults only where it leaves the allocator's segment; the interpreter runs kernels on CPU
tensors, where the checker sees every address.

``checked_bounds()`` (a context manager) patches the interpreter while it is active; the test
session enables it for every test under the interpreter (``conftest.py``; ``KVPOLAR_CHECK_BOUNDS=0``:
off). Found this way: the classic decode kernel's key-metadata reads in a short last split's surplus
blocks, which faulted on an H100.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np


class OutOfBounds(AssertionError):
    pass


_STATE = threading.local()


_HOOKS = ("GridExecutor._init_args_hst", "InterpreterBuilder.create_masked_load",
          "InterpreterBuilder.create_masked_store", "_get_np_dtype")


def missing_hooks() -> list[str]:
    """The interpreter internals ``checked_bounds`` patches that this Triton lacks (empty: it can check)."""
    from triton.runtime import interpreter as interp

    missing = []
    for path in _HOOKS:
        obj = interp
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(path)
    return missing


@contextlib.contextmanager
def checked_bounds():
    from triton.runtime import interpreter as interp

    missing = missing_hooks()
    if missing:
        raise RuntimeError(f"this Triton's interpreter lacks {missing}: the bounds check cannot hook into it")
    executor, builder = interp.GridExecutor, interp.InterpreterBuilder
    real_args, real_load, real_store = executor._init_args_hst, builder.create_masked_load, builder.create_masked_store

    def init_args(self, args_dev, *rest, **kw):
        args_hst, kwargs_hst = real_args(self, args_dev, *rest, **kw)
        ranges = []
        for arg in [*args_hst, *kwargs_hst.values()]:
            for tensor in (arg if isinstance(arg, tuple) else (arg,)):
                if hasattr(tensor, "untyped_storage"):
                    storage = tensor.untyped_storage()
                    ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        _STATE.ranges = ranges
        _STATE.kernel = getattr(self.fn, "__name__", str(self.fn))
        return args_hst, kwargs_hst

    def check(ptrs, mask, what):
        ranges = getattr(_STATE, "ranges", None)
        if ranges is None:
            return
        size = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        addresses = ptrs.data[mask.data.astype(bool)] if mask is not None else ptrs.data.ravel()
        if addresses.size == 0:
            return
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end in ranges:
            inside |= (addresses >= start) & (addresses + size <= end)
        if not inside.all():
            bad = int(addresses[~inside][0])
            near = min(ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])))
            raise OutOfBounds(f"{_STATE.kernel}: {what} of {size} bytes at {bad:#x}, outside every tensor argument "
                              f"(nearest [{near[0]:#x}, {near[1]:#x}): {bad - near[1]:+d} bytes past its end, "
                              f"{int((~inside).sum())} of {addresses.size} addresses out)")

    def load(self, ptrs, mask, *rest, **kw):
        check(ptrs, mask, "load")
        return real_load(self, ptrs, mask, *rest, **kw)

    def store(self, ptrs, value, mask, *rest, **kw):
        check(ptrs, mask, "store")
        return real_store(self, ptrs, value, mask, *rest, **kw)

    executor._init_args_hst, builder.create_masked_load, builder.create_masked_store = init_args, load, store
    try:
        yield
    finally:
        executor._init_args_hst, builder.create_masked_load = real_args, real_load
        builder.create_masked_store = real_store
        _STATE.ranges = None
