"""Greedy tokens of ``model.generate`` plain and with ``custom_generate=kvpolar.replayed_decoding``, on the
8B-shaped model (random weights, ``bench_end_to_end.build_model``, CUDA): where a row's tokens first
differ, the plain run's two largest logits there and the logit of the replayed run's token. A
difference at a step whose two largest logits are a few float16 steps apart, the replayed token being
the plain run's second, is float rounding (e.g. layers kept in 16 bits attend with SDPA in ``generate``
and with kvpolar's kernel when replayed), not a wrong cache.

    PYTHONPATH=src:benchmarks python benchmarks/replayed_tie_check.py [--presets turbo-k3v4 kivi-2]
        [--batch 4] [--prompt 16384] [--new 256] [--layers 32] [--min-chunk 128]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import kvpolar  # noqa: E402
from bench_generate_replayed import model_and_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["turbo-k3v4", "kivi-2"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=16384)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--min-chunk", type=int, default=128)
    args = ap.parse_args()
    model, ids = model_and_prompts(args.layers, args.batch, args.prompt)  # (the benchmark's model and prompts)
    for preset in args.presets:
        cache = kvpolar.enable(model, preset, min_chunk=args.min_chunk)
        plain = model.generate(ids, max_new_tokens=args.new, do_sample=False, pad_token_id=0, output_logits=True,
                               return_dict_in_generate=True, **kvpolar.cache_kwargs(model, cache))
        cache = kvpolar.enable(model, preset, min_chunk=args.min_chunk)
        replayed = model.generate(ids, max_new_tokens=args.new, do_sample=False, pad_token_id=0,
                                  custom_generate=kvpolar.replayed_decoding, **kvpolar.cache_kwargs(model, cache))
        a, b = plain.sequences[:, ids.shape[1]:], replayed[:, ids.shape[1]:]
        for row in range(a.shape[0]):
            differ = (a[row] != b[row]).nonzero()
            if len(differ) == 0:
                print(f"{preset} row {row}: equal over {a.shape[1]} tokens")
                continue
            step = int(differ[0])
            logits = plain.logits[step][row].float()
            top = logits.topk(2)
            print(f"{preset} row {row}: first difference at step {step}, plain {int(a[row, step])}, replayed "
                  f"{int(b[row, step])}; plain top-2 logits {[round(v, 4) for v in top.values.tolist()]} at "
                  f"{top.indices.tolist()}, the replayed token's {float(logits[b[row, step]]):.4f}")


if __name__ == "__main__":
    main()
