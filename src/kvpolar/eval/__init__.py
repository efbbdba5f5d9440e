"""Evaluations of a quantized KV cache on a real model: perplexity, needle retrieval, attention fidelity.

Each evaluation has one entry function the CLI calls (``run_perplexity``, ``run_needle``,
``run_fidelity``, ``run_agreement``): it loads a local checkpoint, runs every preset, and writes a JSON
file, a Markdown report and PNG plots (``report.py``) into ``out_dir``. The lower-level functions take
a loaded model, its tokenizer and an :class:`~kvpolar.eval.presets.EvalPreset`, whose ``make_cache``
returns the ``transformers`` Cache a ``generate``/forward call writes keys and values through.
"""

from kvpolar.eval.agreement import run_agreement
from kvpolar.eval.fidelity import run_fidelity
from kvpolar.eval.needle import run_needle
from kvpolar.eval.perplexity import run_perplexity
from kvpolar.eval.presets import EvalPreset, resolve_presets

__all__ = ["EvalPreset", "resolve_presets", "run_agreement", "run_fidelity", "run_needle", "run_perplexity"]
