"""Files shipped with kvpolar: the built-in tiny Llama model and its held-out evaluation text.

The model (``tiny_llama/``) is a ``LlamaForCausalLM`` trained by ``scripts/train_tiny_model.py`` on
the corpus of ``scripts/build_corpus.py``; its model card is ``tiny_llama/README.md``. The held-out
documents (``heldout/heldout.jsonl``) are the corpus split the model never saw in training::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    import kvpolar.assets

    model = AutoModelForCausalLM.from_pretrained(kvpolar.assets.tiny_model_path())
    tokenizer = AutoTokenizer.from_pretrained(kvpolar.assets.tiny_model_path())
"""

from __future__ import annotations

import json
import pathlib

_HERE = pathlib.Path(__file__).resolve().parent

__all__ = ["heldout_documents", "heldout_path", "tiny_model_path"]


def tiny_model_path() -> pathlib.Path:
    """Directory of the built-in model: config, float16 safetensors shards, tokenizer, model card."""
    return _HERE / "tiny_llama"


def heldout_path() -> pathlib.Path:
    """JSON-lines file of the held-out documents (``{"source", "doc_id", "text"}`` per line)."""
    return _HERE / "heldout" / "heldout.jsonl"


def heldout_documents() -> list[dict[str, str]]:
    """The held-out documents, in corpus order (Bible books, Python doc pages, fortune files)."""
    with open(heldout_path(), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
