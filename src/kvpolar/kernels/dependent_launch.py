"""Programmatic dependent launch (Hopper and later): the merge of the splits starts while the splits run.

A decode-attention call is two kernels in a row: the split kernel reads the packed cache, then the
combine kernel attends the 16-bit residual window and merges the splits' partials. Launched the plain
way, the combine kernel's programs start only once the last split program has ended and its writes
are flushed, so the window's reads and the launch's latency come after the split kernel's tail.

With a dependent launch (CUDA's programmatic stream serialization, Triton's ``launch_pdl``) each split
program signals at its start that the dependent grid may launch (:func:`launch_dependents`); once
every split program has signalled, the combine kernel's programs take SM slots as they free up (at
batch 1 most slots are free from the start), attend their window, and wait (:func:`wait_for_primary`)
for the split kernel to have completed, its memory visible, before they read its partials. What a
combine program reads before that wait was written before the split kernel started (the query, the
window, its length, the mask); it writes only after it.

Where it is used: ``LaunchConfig.dependent_launch`` (by default ``decode_attention.dependent_launch_policy``:
small batches, where it made calls faster on the H100; at large ones it made them slower).

Needs compute capability 9.0 or later and a Triton with grid dependency control
(``triton.language.extra.cuda.gdc_wait``); under Triton's interpreter it is off (:func:`available`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpolar.kernels import cuda_capability, interpreting

try:  # Triton 3.3+: grid dependency control
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GRID_DEPENDENCY_CONTROL = True
except ImportError:  # pragma: no cover - older Triton: the kernels below never call them
    HAS_GRID_DEPENDENCY_CONTROL = False


#: The split kernels' ``LAUNCH_DEPENDENTS`` by ``LaunchConfig.dependent_launch_signal``: where their programs
#: signal (0, the kernels' default: nowhere; the kernel launched next is then a plain launch)
SIGNAL_AT = {"start": 1, "after-loop": 2}


def available(device: torch.device) -> bool:
    """Whether launches on ``device`` can be dependent launches: a CUDA device of compute capability
    9.0 or later, a Triton with grid dependency control, not Triton's interpreter."""
    if device.type != "cuda" or interpreting() or not HAS_GRID_DEPENDENCY_CONTROL:
        return False
    return cuda_capability(device) >= (9, 0)


if HAS_GRID_DEPENDENCY_CONTROL:

    @triton.jit
    def launch_dependents(ENABLED: tl.constexpr):
        """With ENABLED, signal that the kernel launched next (as a dependent launch) may start. (The
        split kernels call it at their start with ``LAUNCH_DEPENDENTS == 1`` and after their block loop
        with ``LAUNCH_DEPENDENTS == 2``: ``SIGNAL_AT``.)"""
        if ENABLED:
            gdc_launch_dependents()

    @triton.jit
    def wait_for_primary(ENABLED: tl.constexpr):
        """With ENABLED, wait until the kernel launched before this one has completed and its writes
        are visible (a no-op where this kernel was not a dependent launch)."""
        if ENABLED:
            gdc_wait()

else:  # pragma: no cover

    @triton.jit
    def launch_dependents(ENABLED: tl.constexpr):
        """No grid dependency control in this Triton: nothing to signal (``available`` is False)."""
        pass

    @triton.jit
    def wait_for_primary(ENABLED: tl.constexpr):
        """No grid dependency control in this Triton: nothing to wait for (``available`` is False)."""
        pass
