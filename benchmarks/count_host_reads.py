"""Count the tensor values read on the host per decode step (``item``, ``bool``, ``int``, ``float``,
``tolist`` on a tensor): on CUDA each is a host-device synchronization that stalls the step.

CPU, no GPU needed: the small random model of ``bench_end_to_end --smoke`` (2 layers), a cache
filled with ``--context`` tokens, then ``--steps`` decode steps counted, per preset, with the source
line (in kvpolar or transformers) that made each read.

    PYTHONPATH=src python benchmarks/count_host_reads.py [--presets kivi-2,turbo-4,fp16] [--steps 40]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_end_to_end as e2e  # noqa: E402

_READS = ("item", "__bool__", "tolist", "__int__", "__float__")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="kivi-2,turbo-4,polar-recursive,fp16")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    e2e.DEVICE = "cpu"
    model = e2e.build_model(2, "cpu")
    counts: collections.Counter = collections.Counter()
    counting = [False]
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def counted(name):
        original = originals[name]

        def read(self, *a, **k):
            if counting[0]:
                ours = [f for f in traceback.extract_stack()[:-1]
                        if "kvpolar" in f.filename or "transformers" in f.filename]
                where = f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else "?"
                counts[name, where] += 1
            return original(self, *a, **k)

        return read

    for name in _READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        for preset in args.presets.split(","):
            counts.clear()
            cache = e2e.make_cache(model, preset)
            with torch.no_grad():
                e2e.fill_cache(model, cache, preset, args.batch, args.context)
                ids = torch.randint(0, model.config.vocab_size, (args.batch, 1))
                pos = torch.full((args.batch, 1), args.context)
                kw = e2e.cache_kwargs(model, cache)
                model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
                counting[0] = True
                for step in range(args.steps):
                    model(input_ids=ids, position_ids=pos + 1 + step, use_cache=True, logits_to_keep=1, **kw)
                counting[0] = False
            print(f"{preset}: {sum(counts.values()) / args.steps:.2f} host reads per decode step "
                  f"({args.steps} steps, 2 layers)")
            for (name, where), n in counts.most_common(8):
                print(f"    {name:9s} {where:28s} {n / args.steps:.2f} per step")
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


if __name__ == "__main__":
    main()
