"""The interpreter's bounds checker (``interpreter_bounds``) itself: it must see a read one element past
a tensor's end, a masked-off read must pass, and reads inside a view's storage pass."""

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from interpreter_bounds import OutOfBounds, checked_bounds, missing_hooks  # noqa: E402
from kernel_checks import DEVICE  # noqa: E402

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="checks the Triton interpreter (CPU machines)")


@triton.jit
def _copy_kernel(src, dst, n, extra, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        x = tl.load(src + offs + extra, mask=offs < n, other=0.0)
    else:
        x = tl.load(src + offs + extra)
    tl.store(dst + offs, x, mask=offs < n)


def test_this_triton_interpreter_can_be_checked():
    """The test session checks every interpreted kernel only where the interpreter has the hooks."""
    assert missing_hooks() == []


def test_a_read_past_the_end_is_caught_and_a_masked_one_is_not():
    src = torch.arange(10, dtype=torch.float32)
    dst = torch.zeros(16)
    with checked_bounds():
        _copy_kernel[(1,)](src, dst, 10, 0, MASKED=True, BLOCK=16)  # (reads 0..9 only)
        assert torch.equal(dst[:10], src)
        with pytest.raises(Exception, match="_copy_kernel: load of 4 bytes .* past its end"):
            _copy_kernel[(1,)](src, dst, 10, 1, MASKED=True, BLOCK=16)  # (element 10: one past)
        with pytest.raises(Exception, match="6 of 16 addresses out"):
            _copy_kernel[(1,)](src, dst, 10, 0, MASKED=False, BLOCK=16)
        view = torch.arange(32, dtype=torch.float32)[4:14]  # (a view: its storage holds 32)
        _copy_kernel[(1,)](view, dst, 10, 1, MASKED=True, BLOCK=16)
    assert issubclass(OutOfBounds, AssertionError)
