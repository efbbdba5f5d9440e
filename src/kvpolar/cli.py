"""The ``kvpolar`` command line. Argument parsing only; the work lives in the library modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from kvpolar.demo import format_table, run_demo

    rows = run_demo(tokens=args.tokens, head_dim=args.head_dim, seed=args.seed)
    print(
        f"kvpolar demo: synthetic RoPE keys with outlier pairs and Gaussian values, 1 x 4 heads x "
        f"{args.tokens} tokens x head dim {args.head_dim}, float16; queries from a rank-8 subspace\n"
    )
    print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpolar", description="KV-cache quantization for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize synthetic keys/values with every method and print a table")
    demo.add_argument("--tokens", type=_positive_int, default=512, help="tokens per head (default 512)")
    demo.add_argument("--head-dim", type=_positive_int, default=128, help="head dimension (default 128)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(handler=_demo)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
