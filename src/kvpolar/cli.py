"""The ``kvpolar`` command line. Argument parsing and messages only; the work lives in the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


DTYPE_CHOICES = ("float16", "bfloat16", "float32")
#: ``kvpolar bench --decoding``: ``kvpolar.generation_demo.DECODINGS`` (not imported here: it loads torch)
DECODING_CHOICES = ("generate", "replayed", "stretches")


class CLIError(Exception):
    """A user error: printed as ``kvpolar: error: ...`` with exit code 2, no traceback."""


def _presets(text: str | None) -> list[str]:
    from kvpolar.cache.config import PRESETS

    names = [p for p in PRESETS if p != "none"] if text in (None, "all") else [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PRESETS]
    if unknown:
        raise CLIError(f"unknown preset(s) {', '.join(unknown)}; available: {', '.join(sorted(PRESETS))}")
    return names


def _device(text: str | None) -> str:
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
    if text != "cpu" and not text.startswith("cuda"):
        raise CLIError(f"--device {text!r} is not supported; allowed: cpu, cuda, cuda:N")
    return text


def _check_model(path: str | None) -> None:
    """A local Hugging Face causal-LM checkpoint directory, or None for the built-in model."""
    if path is None:
        return
    import json
    import pathlib

    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise CLIError(f"--model {path}: no such directory (a local Hugging Face checkpoint is expected)")
    config = folder / "config.json"
    if not config.is_file():
        raise CLIError(f"--model {path}: no config.json there; not a Hugging Face checkpoint")
    archs = json.loads(config.read_text()).get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise CLIError(f"--model {path}: architectures {archs} is not a causal LM (*ForCausalLM)")


def _demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        from kvpolar.demo import format_table, run_demo

        rows = run_demo(tokens=args.tokens, head_dim=args.head_dim, seed=args.seed)
        print(
            f"kvpolar demo --synthetic: RoPE keys with outlier pairs and Gaussian values, 1 x 4 heads x "
            f"{args.tokens} tokens x head dim {args.head_dim}, float16; queries from a rank-8 subspace\n"
        )
        print(format_table(rows))
        return 0
    from kvpolar.generation_demo import format_generation_table, run_generation_demo

    presets = _presets(args.presets)
    device = _device(args.device)
    _check_model(args.model)
    rows, setup = run_generation_demo(
        presets, model_path=args.model, device=device, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, progress=True, dtype=args.dtype,
    )
    print(
        f"\nkvpolar demo: {setup['model']}, {setup['device']}, {setup['dtype']}; greedy generation of "
        f"{setup['new_tokens']} tokens after a {setup['prompt_tokens']}-token held-out prompt\n"
    )
    print(format_generation_table(rows))
    print(f"\n{rows[0].preset} continuation: {rows[0].text[:200]!r}")
    return 0


_EVALS = {
    "ppl": ("run_perplexity", "perplexity of held-out text with keys/values written through the cache"),
    "needle": ("run_needle", "needle-in-a-haystack retrieval accuracy on a depth x length grid"),
    "fidelity": ("run_fidelity", "per-layer relative error of attention scores and outputs vs fp16"),
    "agreement": ("run_agreement", "greedy-generation token agreement with fp16"),
}


def _eval(args: argparse.Namespace) -> int:
    import kvpolar.eval as evaluations

    presets = _presets(args.presets)
    device = _device(args.device)
    _check_model(args.model)
    run = getattr(evaluations, _EVALS[args.metric][0])
    extra = {}
    if args.residual_length is not None:
        if args.metric == "fidelity":
            raise CLIError("--residual-length does not apply to fidelity: it applies the quantizers to every "
                           "key and value directly, without a cache")
        extra["residual_length"] = args.residual_length
    try:
        results = run(args.model, presets, device=device, max_length=args.max_length, out_dir=args.out,
                      progress=True, dtype=args.dtype, **extra)
    except ValueError as err:  # e.g. a context longer than the model supports
        raise CLIError(str(err)) from None
    for path in results.get("files", []):
        print(f"wrote {path}")
    markdown = results.get("markdown")
    if markdown:
        print(markdown)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from kvpolar.bench import run_bench

    presets = _presets(args.presets)
    device = _device(args.device)
    _check_model(args.model)
    try:
        results = run_bench(args.model, presets, device=device, max_length=args.max_length, out_dir=args.out,
                            new_tokens=args.new_tokens, progress=True, dtype=args.dtype, decoding=args.decoding)
    except ValueError as err:
        raise CLIError(str(err)) from None
    for path in results["files"]:
        print(f"wrote {path}")
    print(results["markdown"])
    return 0


def _common_options(parser: argparse.ArgumentParser, max_length: int, dtype: str | None = None) -> None:
    """``dtype``: the ``--dtype`` default (None: float16 on CUDA, float32 on CPU)."""
    parser.add_argument("--model", default=None, help="local Hugging Face checkpoint (default: the built-in model)")
    parser.add_argument("--presets", default=None, help="comma-separated presets (default: all)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--max-length", type=_positive_int, default=max_length,
                        help=f"context length in tokens (default {max_length})")
    parser.add_argument("--out", default="kvpolar-results", help="output directory (default: kvpolar-results)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=dtype,
                        help="model and cache dtype (default: " + (f"{dtype}, on the CPU too)" if dtype else
                                                                   "float16 on CUDA, float32 on CPU)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpolar", description="KV-cache quantization for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="generate on the built-in model with the 16-bit cache and every preset; print a table"
    )
    demo.add_argument("--model", default=None, help="local Hugging Face checkpoint (default: the built-in model)")
    demo.add_argument("--presets", default=None, help="comma-separated presets (default: all)")
    demo.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    demo.add_argument("--prompt-tokens", type=_positive_int, default=768, help="prompt length (default 768)")
    demo.add_argument("--new-tokens", type=_positive_int, default=48, help="tokens to generate (default 48)")
    demo.add_argument("--dtype", choices=DTYPE_CHOICES, default="float16",
                      help="model and cache dtype (default float16, on the CPU too)")
    demo.add_argument("--synthetic", action="store_true",
                      help="instead: quantize synthetic keys/values with every quantizer, print errors")
    demo.add_argument("--tokens", type=_positive_int, default=512, help="--synthetic: tokens per head")
    demo.add_argument("--head-dim", type=_positive_int, default=128, help="--synthetic: head dimension")
    demo.add_argument("--seed", type=int, default=0, help="--synthetic: random seed")
    demo.set_defaults(handler=_demo)

    evaluate = sub.add_parser("eval", help="evaluate presets on a model: JSON, Markdown report and PNG plots")
    metrics = evaluate.add_subparsers(dest="metric", required=True)
    for metric, (_, text) in _EVALS.items():
        sub_metric = metrics.add_parser(metric, help=text, description=text)
        _common_options(sub_metric, max_length=1024)
        sub_metric.add_argument("--residual-length", type=_non_negative_int, default=None,
                                help="16-bit window of newest tokens for every preset (default: the preset's, 128)")
        sub_metric.set_defaults(handler=_eval)

    bench = sub.add_parser("bench", help="decode speed and cache memory per preset on a model")
    _common_options(bench, max_length=1024, dtype="float16")  # as demo: bits/element of a 16-bit deployment
    bench.add_argument("--new-tokens", type=_positive_int, default=64, help="tokens to decode (default 64)")
    bench.add_argument("--decoding", choices=DECODING_CHOICES, default="generate",
                       help="how the presets decode: generate (model.generate), replayed (decode steps recorded "
                            "in CUDA graphs and replayed: generate with custom_generate=kvpolar.replayed_decoding; "
                            "CUDA only) or stretches (the replayed path's steps run eagerly; any device). "
                            "Default: generate")
    bench.set_defaults(handler=_bench)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CLIError as err:
        parser.exit(2, f"kvpolar: error: {err}\n")
    except ModuleNotFoundError as err:
        if err.name in ("transformers", "tqdm", "matplotlib", "accelerate"):
            parser.exit(2, f"kvpolar: error: '{args.command}' needs {err.name}: pip install 'kvpolar[eval]'\n")
        raise


if __name__ == "__main__":
    sys.exit(main())
