"""Test-session set-up shared by every test module."""

import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter when there is no GPU. The variable
# must be set before any kernel module is imported (``@triton.jit`` reads it then), so here, not in
# the individual test modules, whose import order pytest decides.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Under the interpreter every kernel's loads and stores are checked against its tensor arguments
# (``interpreter_bounds``; about 5% more time); KVPOLAR_CHECK_BOUNDS=0 turns the check off.
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("KVPOLAR_CHECK_BOUNDS", "1") != "0":
    import pytest

    @pytest.fixture(autouse=True)
    def _interpreter_bounds():
        """Every interpreted kernel's loads and stores checked against its tensors (``interpreter_bounds``;
        a Triton whose interpreter lacks the hooks runs unchecked, and ``test_interpreter_bounds`` fails)."""
        try:
            from interpreter_bounds import checked_bounds, missing_hooks

            missing = missing_hooks()
        except ImportError:  # (no triton: no interpreted kernels)
            missing = ["triton"]
        if missing:
            yield
            return
        with checked_bounds():
            yield
