"""Loading a local checkpoint and the held-out evaluation text, with clear errors."""

from __future__ import annotations

import pathlib
from typing import Any

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when present, else CPU; anything else as given (checked)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> float16 on CUDA, float32 on CPU (fastest there); else one of :data:`DTYPES`.

    The cache stores keys, values and quantization metadata in the model's dtype, so bits/element
    and the 16-bit baseline are those of a float16 deployment only with float16 or bfloat16.
    """
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")


def load_model(
    model_path: str | pathlib.Path | None, device: str | torch.device | None, dtype: str | torch.dtype | None = None
) -> tuple[Any, Any, torch.device]:
    """A causal LM and its tokenizer from a local directory (default: the built-in tiny model).

    ``dtype``: see :func:`resolve_dtype`. Raises ValueError for a missing directory or a checkpoint
    that is not a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if model_path is None:
        from kvpolar.assets import tiny_model_path

        model_path = tiny_model_path()
    path = pathlib.Path(model_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model path {str(path)!r} is not a local Hugging Face checkpoint (no config.json there)")
    config = AutoConfig.from_pretrained(path)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"model at {str(path)!r} has model_type {config.model_type!r}, which is not a causal LM"
        )
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, device


def max_context(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def check_length(model: Any, length: int, what: str = "max_length") -> None:
    limit = max_context(model)
    if length < 2:
        raise ValueError(f"{what}={length}; it must be at least 2 tokens")
    if limit and length > limit:
        raise ValueError(f"{what}={length} is longer than the model's context ({limit} tokens)")


def heldout_token_ids(tokenizer: Any) -> list[int]:
    """The held-out documents shipped with kvpolar, tokenized and concatenated (each starts with BOS)."""
    from kvpolar.assets import heldout_documents

    ids: list[int] = []
    for doc in heldout_documents():
        ids.extend(tokenizer(doc["text"], verbose=False).input_ids)
    return ids


def heldout_text() -> str:
    from kvpolar.assets import heldout_documents

    return "\n\n".join(d["text"] for d in heldout_documents())
