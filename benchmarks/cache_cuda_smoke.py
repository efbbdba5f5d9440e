"""CUDA check of the transformers cache: a tiny random Llama in float16 generates with every registered preset.

Usage: python benchmarks/cache_cuda_smoke.py [OUT_DIR] [--presets kivi-2 polar-rope-3 ...]. Prints each
preset's row as it finishes, then a table; writes cache_cuda_smoke.json after every preset (a run cut
off keeps the presets it finished). On a fresh GPU machine most of the time is Triton compiling each
preset's kernels (decode, beam search, 21-token verify steps): minutes for all presets.
Proves the CUDA path runs (fused kernel if installed, else the reference with a warning) and reports
teacher-forced logit error against the stock DynamicCache. Per preset also: beam search (2 beams,
the packed parts reordered every step) and assisted decoding with a one-layer draft model proposing
20 tokens per round (verify steps of 21 query tokens x GQA 4 = 84 rows through the fused kernel,
rejected tokens cropped from the 16-bit window), whose tokens should match plain greedy decoding's.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings

import torch
import transformers

import kvpolar
from kvpolar.cache.cache import QuantizedKVCache
from kvpolar.cache.config import PRESETS


def main(out_dir: str | None, only: list[str] | None = None) -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dev, torch.float16).eval()
    draft = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 1}))
    draft = draft.to(dev, torch.float16).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 256, (2, 300), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding on row 1
    cont = torch.randint(1, 256, (2, 16), generator=gen).to(dev)

    def result_of(rows, caught) -> dict:
        notes = sorted({str(w.message) for w in caught if "kvpolar" in str(w.message)})
        return {"device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(),
                "command": " ".join(["python", "benchmarks/cache_cuda_smoke.py", *sys.argv[1:]]),
                "reference_logit_scale": ref.abs().max().item(), "warnings": notes, "rows": rows}

    @torch.no_grad()
    def teacher_forced(cache):
        m = mask.clone()
        kw = kvpolar.cache_kwargs(model, cache)
        out = model(input_ids=ids, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0), **kw)
        logits = [out.logits[:, -1].float()]
        for t in range(cont.shape[1]):
            m = torch.cat([m, torch.ones_like(m[:, :1])], -1)
            out = model(input_ids=cont[:, t:t + 1], attention_mask=m, position_ids=m.sum(-1, keepdim=True) - 1, **kw)
            logits.append(out.logits[:, -1].float())
        return torch.stack(logits, 1)

    presets = [name for name, c in PRESETS.items()
               if {c.key_quantizer, c.value_quantizer} <= set(kvpolar.available_quantizers())]
    if only:
        unknown = sorted(set(only) - set(presets))
        if unknown:
            raise SystemExit(f"--presets {' '.join(unknown)}: not a preset here (allowed: {', '.join(presets)})")
        presets = [p for p in presets if p in only]
    model.set_attn_implementation("sdpa")
    ref = teacher_forced(transformers.DynamicCache(config=model.config))
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for preset in presets:
            try:
                cache = kvpolar.enable(model, preset)
                err = (teacher_forced(cache) - ref).abs().max().item()
                cache = QuantizedKVCache(model.config, preset)
                seq = model.generate(ids, attention_mask=mask, **kvpolar.cache_kwargs(model, cache), max_new_tokens=16,
                                     do_sample=False, pad_token_id=0)
                rep = cache.memory_report()
                packed = [l.packed_keys for l in cache.layers if l.packed_keys is not None]
                beam_cache = QuantizedKVCache(model.config, preset)
                beams = model.generate(ids, attention_mask=mask, **kvpolar.cache_kwargs(model, beam_cache),
                                       max_new_tokens=8, num_beams=2, do_sample=False, pad_token_id=0)
                greedy = {}
                for name, extra in (("plain", {}), ("assisted", {"assistant_model": draft, "num_assistant_tokens": 20,
                                                                 "num_assistant_tokens_schedule": "constant"})):
                    one = QuantizedKVCache(model.config, preset)
                    greedy[name] = model.generate(ids[:1], **kvpolar.cache_kwargs(model, one), max_new_tokens=24,
                                                  do_sample=False, pad_token_id=0, **extra)[0, ids.shape[1]:]
            except Exception as exc:  # record and go on: one broken method must not hide the others
                rows.append({"preset": preset, "error": f"{type(exc).__name__}: {exc}"})
            else:
                n = min(len(greedy["plain"]), len(greedy["assisted"]))
                rows.append({"preset": preset, "max_logit_err": err, "tokens": rep.tokens,
                             "generated": int(seq.shape[1] - ids.shape[1]), "bits_per_element": rep.bits_per_element,
                             "compression": rep.compression_ratio,
                             "packed_dtype": str(packed[0].dtype) if packed else None,
                             "beam_generated": int(beams.shape[1] - ids.shape[1]),
                             "assisted_agreement": float((greedy["plain"][:n] == greedy["assisted"][:n]).float().mean())})
            print(f"done {preset}: {rows[-1]}", flush=True)
            if out_dir:  # after every preset, failed ones too: a run cut off keeps what it finished
                write(out_dir, result_of(rows, caught))
    result = result_of(rows, caught)
    if out_dir and not rows:
        write(out_dir, result)
    notes = result["warnings"]
    print(*notes, sep="\n")
    print(f"{result['device']}  torch {torch.__version__}  transformers {transformers.__version__}  logit scale {result['reference_logit_scale']:.3f}")
    print(f"{'preset':8} {'max|dlogit|':>12} {'tokens':>7} {'gen':>4} {'bits/el':>8} {'compr':>6} {'beam':>5} "
          f"{'assisted=greedy':>16}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:8} ERROR {r['error']}")
            continue
        print(f"{r['preset']:8} {r['max_logit_err']:12.4g} {r['tokens']:7d} {r['generated']:4d} "
              f"{r['bits_per_element']:8.3f} {r['compression']:6.2f} {r['beam_generated']:5d} "
              f"{100 * r['assisted_agreement']:15.0f}%")


def write(out_dir: str, result: dict) -> None:
    with open(f"{out_dir}/cache_cuda_smoke.json", "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default=None, help="where to write cache_cuda_smoke.json")
    ap.add_argument("--presets", nargs="+", default=None, help="these presets only (default: every registered one)")
    args = ap.parse_args()
    main(args.out_dir, args.presets)
