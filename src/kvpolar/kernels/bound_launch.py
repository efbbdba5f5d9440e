"""Relaunching a compiled Triton kernel with its arguments bound once and a few of them changed.

Triton's dispatcher (``kernel[grid](*args, **kwargs)``) binds, specializes and hashes every argument
at every launch. The decode kernels take about 90 arguments (60 of them compile-time constants), and
a decode step launches the packed tokens' kernel of a layer with the same arguments as the step
before, except the query, the partial-output buffers and a few integers. A :class:`BoundLaunch`
launches once through the dispatcher, keeps the compiled kernel and the argument values in the
kernel's parameter order, and afterwards launches the compiled kernel itself
(``CompiledKernel[grid](*values)``) with the changed values put in, provided each changed value is
specialized as the one it replaces: a tensor's dtype and 16-byte alignment, an integer's being 1, a
multiple of 16 and its width, a float as a float (``specialization``). Anything else goes back to the
dispatcher, which compiles or finds the right kernel, and that launch is bound too.

Tensors on a CUDA device reach the compiled kernel as their addresses (``ADDRESSES``): Triton's
launcher otherwise calls each tensor's ``data_ptr()`` and asks the driver whether the address is a
device one (``cuPointerGetAttribute``), about 20 times per split-kernel launch. The arguments that
stay bound are converted once (the bound values keep their tensors alive), the varying ones at each
launch from the ``data_ptr()`` their specialization reads anyway. Other tensors (a CPU tensor by
mistake) are handed over as they are, so the launcher still rejects them.

Under the Triton interpreter, or with a Triton whose compiled-kernel API differs, every launch goes
through the dispatcher (nothing is bound).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Iterable

import torch

#: launch options Triton takes as keywords beside the kernel's parameters
_LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid",
                             "launch_pdl"})


#: Tensors on a CUDA device handed to compiled kernels as their addresses (False: as tensors, which
#: Triton's launcher converts, checking each with the driver).
ADDRESSES = True


def specialization(value: Any) -> object:
    """What Triton's dispatcher specializes a runtime argument on: a tensor's dtype and 16-byte
    alignment; an integer's width (32 or 64 bits, signed or not), its being 1 and its being a
    multiple of 16; a float's type only; anything else by value (None, bools, constants)."""
    kind = type(value)
    if kind is int:
        if -0x80000000 <= value <= 0x7FFFFFFF:
            return 32, value == 1, not value & 15
        return 64 if -(2**63) <= value < 2**63 else 65, value == 1, not value & 15
    if kind is float:
        return float
    if isinstance(value, torch.Tensor):
        return value.dtype, not value.data_ptr() & 15
    return value


def _keyed(values: tuple) -> tuple[list, list]:
    """``([specialization(v) for v in values], values with CUDA tensors as their addresses)`` in one
    pass, the two common cases (integers, plain tensors) inline: the varying values of every launch.
    (Tensor subclasses take ``specialization`` and are handed over as they are.)"""
    key: list = []
    given: list = []
    add_key, add_given = key.append, given.append
    for value in values:
        kind = type(value)
        if kind is int:
            add_key((32 if -0x80000000 <= value <= 0x7FFFFFFF else (64 if -(2**63) <= value < 2**63 else 65),
                     value == 1, not value & 15))
            add_given(value)
        elif kind is torch.Tensor:
            address = value.data_ptr()
            add_key((value.dtype, not address & 15))
            add_given(address if value.is_cuda else value)
        else:
            add_key(specialization(value))
            add_given(value)
    return key, given


@functools.lru_cache(maxsize=64)
def _signature(fn: Any) -> inspect.Signature:
    return inspect.signature(fn)


def _constexpr(param: inspect.Parameter) -> bool:
    """Whether a kernel parameter is annotated ``tl.constexpr`` (the object, or its name as a string)."""
    return "constexpr" in str(param.annotation)


def _current_device() -> int:
    return torch.cuda.current_device()


class BoundLaunch:
    """Launches of one kernel whose arguments other than ``varying`` (parameter names, in this order)
    stay the same from launch to launch.

    ``launch(grid, args, kwargs)`` launches through Triton's dispatcher and binds the arguments under
    the specialization of the ``varying`` ones; ``relaunch(grid, values)`` takes the ``varying``
    arguments' new values in that order, launches the compiled kernel bound under their
    specialization with them put in, and returns True; or returns False without launching when
    there is none (nothing bound yet under that specialization, another CUDA device): the caller then
    builds every argument and calls ``launch``. Each specialization of the varying arguments keeps
    its own compiled kernel (a decode step's window length is now and then a multiple of 16)."""

    def __init__(self, kernel: Any, varying: Iterable[str]) -> None:
        self.kernel = kernel
        self.varying = tuple(varying)
        fn = getattr(kernel, "fn", None)
        if fn is not None:
            params = _signature(fn).parameters
            unknown = [name for name in self.varying if name not in params]
            constant = [name for name in self.varying if name in params and _constexpr(params[name])]
            if unknown or constant:
                raise ValueError(f"varying arguments must be runtime parameters of {getattr(fn, '__name__', fn)}; "
                                 f"not parameters: {unknown}, compile-time constants: {constant}")
        # specialization of the varying values -> (compiled, values, values with device tensors as addresses)
        self._bound: dict[tuple, tuple[Any, list, list]] = {}
        self._slots: tuple[int, ...] = ()
        self._device: int | None = None
        self.direct_launches = 0  # launches that skipped the dispatcher (for tests and benchmarks)

    @property
    def bound(self) -> bool:
        """Whether any compiled kernel is bound (else ``relaunch`` returns False at once)."""
        return bool(self._bound)

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        """Launch ``kernel[grid](*args, **kwargs)`` through the dispatcher and bind its arguments."""
        compiled = self.kernel[grid](*args, **kwargs)
        self._bind(compiled, args, kwargs)

    def relaunch(self, grid: tuple[int, ...], values: tuple) -> bool:
        """Launch the compiled kernel bound for these ``varying`` values; False (nothing launched) if none is."""
        prepared = self.prepared(values)
        if prepared is None:
            return False
        compiled, launch_values = prepared
        compiled[(*grid, 1, 1)[:3]](*launch_values)  # (a compiled kernel takes three grid sizes)
        self.direct_launches += 1
        return True

    def prepared(self, values: tuple) -> tuple[Any, list] | None:
        """(compiled kernel, every parameter's value in order) that ``relaunch`` would launch for these
        ``varying`` values; None where nothing is bound for them (or the current device is another)."""
        if not self._bound or _current_device() != self._device:
            return None
        key, given = _keyed(values) if ADDRESSES else ([specialization(v) for v in values], values)
        entry = self._bound.get(tuple(key))
        if entry is None:
            return None
        compiled, tensors, addresses = entry
        launch_values = (addresses if ADDRESSES else tensors).copy()
        for slot, value in zip(self._slots, given):
            launch_values[slot] = value
        return compiled, launch_values

    def _bind(self, compiled: Any, args: tuple, kwargs: dict) -> None:
        if not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata", "__getitem__")):
            return  # the interpreter (no compiled kernel) or another Triton's API: the dispatcher each time
        try:
            fn = self.kernel.fn
            signature = _signature(fn)
            bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
            bound.apply_defaults()
        except (AttributeError, TypeError):
            return
        params = list(signature.parameters)
        device = _current_device()
        if device != self._device:
            self._bound.clear()
        self._device = device
        values = [bound.arguments[name] for name in params]
        self._slots = tuple(params.index(name) for name in self.varying)
        key = tuple(specialization(values[slot]) for slot in self._slots)
        for slot in self._slots:  # always replaced: keep no buffer of this launch alive
            values[slot] = None
        # the same values with the device tensors as addresses (the list above keeps the tensors alive)
        addresses = [v.data_ptr() if isinstance(v, torch.Tensor) and v.is_cuda else v for v in values]
        self._bound[key] = (compiled, values, addresses)
