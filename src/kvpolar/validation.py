"""Input checks shared by every quantizer: errors name the parameter, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def allowed(name: str, value: Any, allowed_values: Iterable[Any] | str) -> ValueError:
    """A ValueError saying ``name=value`` is not one of the allowed values."""
    if not isinstance(allowed_values, str):
        allowed_values = ", ".join(repr(v) for v in allowed_values)
    return ValueError(f"{name}={value!r} is not supported; allowed: {allowed_values}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if not any(type(value) is type(c) and value == c for c in choices):
        raise allowed(name, value, choices)


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise allowed(name, value, "a positive integer")


def check_float_tensor(name: str, x: Any, min_rank: int = 2) -> None:
    """``x`` must be a float16/bfloat16/float32 tensor of rank >= ``min_rank``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; allowed: float16, bfloat16, float32"
        )
    if x.dim() < min_rank:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} (rank {x.dim()}); expected rank >= {min_rank}, "
            "laid out [..., tokens, head_dim]"
        )
