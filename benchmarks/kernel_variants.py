"""Which arguments of the decode kernels change Triton's specialization from one decode step to the
next, on the CPU (no GPU, nothing is launched).

Triton compiles one variant per class of its integer arguments (== 1, divisible by 16) and pointer
alignments; each new class met while decoding costs a compile (about 2 s on an H100,
``profile_decode_step.py``). This drives a one-layer Llama (head dim 128, 4 / 1 heads) through a
``kvpolar`` cache for ``--steps`` decode steps, calls ``fused_decode_attention`` on the layer's stored
tensors after each step with the kernels replaced by recorders, and prints the number of distinct
variants per kernel and pair of formats (``[key format id, value format id]``; 0 = the 16-bit residual
window) and the arguments whose class changed.

    PYTHONPATH=src python benchmarks/kernel_variants.py [--presets turbo-4,kivi-2] [--steps 40]
"""
import argparse

import torch
import transformers

import kvpolar
from kvpolar.kernels import decode_attention as da


class Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the specialization key
    (integers the kernel marks ``do_not_specialize`` left out)."""

    def __init__(self, kernel, name: str, seen: list):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            names = self.kernel.arg_names[: len(args)]
            unspecialized = {p.name for p in getattr(self.kernel, "params", ()) if getattr(p, "do_not_specialize", False)}
            key = {}
            for n, a in zip(names, args):
                if isinstance(a, torch.Tensor):
                    key[n] = a.data_ptr() % 16 == 0
                elif isinstance(a, int) and not isinstance(a, bool) and n not in unspecialized:
                    key[n] = (a == 1, a % 16 == 0)
            key.update({n: v for n, v in kwargs.items() if not isinstance(v, torch.Tensor)})
            self.seen.append((self.name, key))
        return call


@torch.no_grad()
def variants(preset: str, steps: int) -> dict:
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                                   max_position_embeddings=8192)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    cache = kvpolar.enable(model, preset)
    seen: list = []
    kernels = ("_split_kernel", "_split_kernel_t", "_combine_kernel", "_window_combine_kernel",
               "_kv_head_window_combine_kernel")
    saved = {n: getattr(da, n) for n in kernels + ("_WINDOW_LAUNCHES", "_COMBINE_LAUNCHES")}
    interpreting = da._interpreting
    try:
        for n in kernels:
            setattr(da, n, Recorder(saved[n], n, seen))
        # (bound launches made with this run's recorders, not an earlier preset's)
        da._WINDOW_LAUNCHES, da._COMBINE_LAUNCHES = {}, {}
        da._interpreting = lambda: False  # the launch parameters of a GPU run
        ids = torch.randint(0, 256, (2, 300))
        model(input_ids=ids, **kvpolar.cache_kwargs(model, cache), use_cache=True)
        for _ in range(steps):
            model(input_ids=ids[:, :1], **kvpolar.cache_kwargs(model, cache), use_cache=True)
            layer = cache.layers[0]
            if layer.packed_keys is not None:
                q = torch.randn(2, 4, 1, 128)
                da.fused_decode_attention(q, layer.packed_keys, layer.packed_values, None, None, layer.keys,
                                          layer.values, 0.1)
    finally:
        for n, k in saved.items():
            setattr(da, n, k)
        da._interpreting = interpreting
    out = {}
    for name, key in seen:  # one entry per kernel and pair of formats (the packed part, the residual window)
        launch = f"{name}[{key.get('KEY_FMT', '-')},{key.get('VAL_FMT', '-')}]"
        entry = out.setdefault(launch, {"keys": [], "changing": set()})
        if key not in entry["keys"]:
            entry["keys"].append(key)
    for entry in out.values():
        first = entry["keys"][0]
        entry["changing"] = sorted(n for k in entry["keys"] for n in k if k[n] != first.get(n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="turbo-4,kivi-2,polar-recursive")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    for preset in args.presets.split(","):
        for name, entry in variants(preset, args.steps).items():
            print(f"{preset:16s} {name:20s} {len(entry['keys'])} variant(s) in {args.steps} steps; "
                  f"changing: {', '.join(dict.fromkeys(entry['changing'])) or '-'}")


if __name__ == "__main__":
    main()
