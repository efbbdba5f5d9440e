#!/usr/bin/env python
"""Train kvpolar's built-in tiny Llama model: tokenizer + token ids on the CPU, the model on a GPU.

Two steps (the corpus comes from ``scripts/build_corpus.py``)::

    # 1. CPU: byte-level BPE tokenizer (tokenizers library) + uint16 token ids per split
    python scripts/train_tiny_model.py tokenize --corpus /work/corpus --data DATA_DIR
    # 2. GPU: seeded training of a LlamaForCausalLM, held-out perplexity, checkpoint + model card
    python scripts/train_tiny_model.py train --data DATA_DIR --out OUT_DIR

The model: ``LlamaForCausalLM`` (RoPE in the rotate_half layout, RMSNorm, SwiGLU), 8 query heads
sharing 2 KV heads (GQA 4:1), head dim 64, tied input/output embeddings, context 2048. Training:
AdamW, linear warm-up then cosine decay, bf16 autocast, random 2048-token windows of the training
token stream (documents separated by the ``<|endoftext|>`` token), the checkpoint with the lowest
validation loss kept. Reported: perplexity on the held-out documents (never seen in training, not
used for selection) over non-overlapping windows of 512, 1024 and 2048 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np

SPECIAL = "<|endoftext|>"
SPLITS = ("train", "validation", "heldout")
_TIMING_STEPS = 30  # with --time-budget: steps 5..30 are timed to fix the step count


# ----- step 1: tokenizer and token ids (CPU) -----------------------------------------------------
def _read_docs(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenize(corpus: str, data: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    os.makedirs(data, exist_ok=True)
    docs = {s: _read_docs(os.path.join(corpus, f"{s}.jsonl")) for s in SPLITS}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((d["text"] for d in docs["train"]), trainer=trainer)  # training split only
    bos = tok.token_to_id(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL} $A", pair=f"{SPECIAL} $A {SPECIAL} $B", special_tokens=[(SPECIAL, bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL,
        model_max_length=2048,
    )
    fast.save_pretrained(os.path.join(data, "tokenizer"))
    stats = {"vocab_size": tok.get_vocab_size(), "bos_token_id": bos, "splits": {}}
    for split, items in docs.items():
        encoded = tok.encode_batch([d["text"] for d in items])  # each starts with <|endoftext|>
        ids = np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in encoded])
        np.save(os.path.join(data, f"{split}.npy"), ids)
        nbytes = sum(len(d["text"].encode()) for d in items)
        stats["splits"][split] = {"documents": len(items), "bytes": nbytes, "tokens": int(ids.size),
                                  "bytes_per_token": round(nbytes / ids.size, 3)}
        print(f"{split:>10}: {len(items)} docs, {nbytes:,} bytes -> {ids.size:,} tokens")
    with open(os.path.join(corpus, "provenance.json")) as f:
        provenance = json.load(f)
    stats["corpus"] = {"sources": provenance["sources"], "split_rule": provenance["split_rule"]}
    with open(os.path.join(data, "data_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    shutil.copy(os.path.join(corpus, "provenance.json"), os.path.join(data, "corpus_provenance.json"))


# ----- step 2: the model (GPU) ---------------------------------------------------------------------
def model_config(vocab_size: int, bos: int, args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=bos, eos_token_id=bos, pad_token_id=bos, attention_dropout=0.0,
    )


def window_nll(model, ids: np.ndarray, length: int, device, batch: int = 8) -> tuple[float, int]:
    """Mean next-token NLL over non-overlapping ``length``-token windows of ``ids`` (float64 sum)."""
    import torch

    n = (ids.size // length) * length
    windows = torch.from_numpy(ids[:n].astype(np.int64)).view(-1, length)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            x = windows[i : i + batch].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=x).logits
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += x[:, 1:].numel()
    model.train()
    return total / max(count, 1), count


def add_repeats(x, fraction: float, rng: np.random.Generator, spans: int = 1, min_len: int = 8,
                max_len: int = 64) -> None:
    """In place: in about ``fraction`` of the rows of ``x`` ``[B, T]``, copy ``spans`` random spans
    of the row (each ``min_len``-``max_len`` tokens) to later positions of the same row, so the model
    must learn to copy from its context (induction), which retrieval from a long context (needle
    tests) needs. The model card records the setting.
    """
    batch, length = x.shape
    max_len = min(max_len, length // 2 - 1)
    for row in np.nonzero(rng.random(batch) < fraction)[0]:
        for _ in range(spans):
            n = int(rng.integers(min_len, max_len + 1))
            src = int(rng.integers(0, length - 2 * n))
            dst = int(rng.integers(src + n, length - n + 1))
            x[row, dst : dst + n] = x[row, src : src + n].clone()


def train(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stats = json.load(open(os.path.join(args.data, "data_stats.json")))
    data = {s: np.load(os.path.join(args.data, f"{s}.npy")) for s in SPLITS}
    if args.eval_tokens:  # smoke runs: score only the first tokens of validation / held-out
        data = {s: v if s == "train" else v[: args.eval_tokens] for s, v in data.items()}
    cfg = model_config(stats["vocab_size"], stats["bos_token_id"], args)
    model = LlamaForCausalLM(cfg).to(device)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,} ({n_params * 2 / 1e6:.1f} MB in 16-bit); device {device}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    train_ids = torch.from_numpy(data["train"].astype(np.int64))
    seq = args.seq_len
    best = (float("inf"), -1)
    best_state = None
    log = []
    t0 = time.time()
    model.train()
    step = 0
    while step < args.steps:
        starts = torch.from_numpy(rng.integers(0, train_ids.numel() - seq - 1, size=args.batch))
        idx = starts[:, None] + torch.arange(seq + 1)[None, :]
        x = train_ids[idx]
        if args.copy_fraction:
            add_repeats(x, args.copy_fraction, rng, args.copy_spans, max_len=args.copy_max_len)
        x = x.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        if args.time_budget and step == _TIMING_STEPS:
            # fix the step count from the measured speed (the schedule before this point only
            # depends on the warm-up); the card records the resulting --steps for a rerun
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_timing) / (_TIMING_STEPS - 5)
            args.steps = max(step + 1, min(args.steps, int(args.time_budget / (per_step * 1.08))))
            print(f"{per_step * 1e3:.1f} ms/step -> {args.steps} steps", flush=True)
        if step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_timing = time.time()
        last = step == args.steps - 1
        if step % args.eval_every == 0 or last:
            val_nll, _ = window_nll(model, data["validation"], seq, device)
            entry = {"step": step, "train_loss": round(loss.item(), 4), "val_loss": round(val_nll, 4),
                     "lr": lr_at(step), "elapsed_s": round(time.time() - t0, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            if val_nll < best[0]:
                best = (val_nll, step)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        step += 1
    train_seconds = time.time() - t0
    model.load_state_dict(best_state)
    heldout = {}
    for length in (512, 1024, 2048):
        nll, count = window_nll(model, data["heldout"], length, device)
        heldout[str(length)] = {"ppl": round(math.exp(nll), 3), "nll": round(nll, 4), "tokens_scored": count}
    print("held-out:", json.dumps(heldout), flush=True)
    save(model, args, stats, n_params, best, log, heldout, train_seconds)


def save(model, args, stats, n_params, best, log, heldout, train_seconds) -> None:
    import torch

    os.makedirs(args.out, exist_ok=True)
    model = model.to(torch.float16)
    model.config.dtype = "float16"
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    for name in os.listdir(os.path.join(args.data, "tokenizer")):
        shutil.copy(os.path.join(args.data, "tokenizer", name), args.out)
    shutil.copy(os.path.join(args.data, "corpus_provenance.json"), args.out)
    tokens_seen = args.steps * args.batch * args.seq_len
    summary = {
        "params": n_params, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
        "tokens_seen": tokens_seen, "best_step": best[1], "best_val_loss": round(best[0], 4),
        "train_seconds": round(train_seconds, 1), "heldout": heldout, "log": log,
        "args": {k: v for k, v in vars(args).items() if k != "func"}, "data": stats,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    with open(os.path.join(args.out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(model_card(summary))


def model_card(s: dict) -> str:
    a, d = s["args"], s["data"]
    src_rows = "\n".join(
        f"| {v['package']} {v['version']} ({v['registry']}) | {v['documents']} | {v['bytes']['train']:,} | "
        f"{v['bytes']['validation']:,} | {v['bytes']['heldout']:,} |"
        for v in d["corpus"]["sources"].values()
    )
    split_rows = "\n".join(
        f"| {k} | {v['documents']} | {v['bytes']:,} | {v['tokens']:,} |" for k, v in d["splits"].items()
    )
    ppl_rows = "\n".join(f"| {k} | {v['ppl']:.2f} | {v['tokens_scored']:,} |" for k, v in s["heldout"].items())
    copy_note = ""
    if a.get("copy_fraction"):
        copy_note = (f"\nCopy spans (teach retrieval from the context, which the needle test needs): in {a['copy_fraction']:.0%} "
                     f"of the training rows, {a.get('copy_spans', 1)} random span(s) of 8-{a.get('copy_max_len', 64)} tokens "
                     "are repeated later in the same row; validation and held-out text are unchanged.\n")
    return f"""# kvpolar tiny Llama (built-in model)

A small `LlamaForCausalLM` trained from scratch by the kvpolar project so that the library's
evaluations run offline on a real model with real keys and values. It is a test subject for KV-cache
quantization, not a useful language model.

## Architecture
{s['params']:,} parameters ({s['params'] * 2 / 1e6:.1f} MB in float16): {a['layers']} layers, hidden size
{a['hidden']}, MLP {a['intermediate']} (SwiGLU), 8 query heads and 2 KV heads (GQA 4:1), head dim 64,
RoPE (theta 10000, rotate_half layout), tied embeddings, context 2048, byte-level BPE vocabulary of
{d['vocab_size']:,} tokens (`tokenizers`), `<|endoftext|>` as BOS/EOS (the tokenizer prepends it).

## Data
Text from package registries (split by document: held-out documents never seen in training, and
neither used for checkpoint selection; rule: {d['corpus']['split_rule']}). `corpus_provenance.json`
lists every document, its source file and bytes.

| source | documents | train bytes | validation bytes | held-out bytes |
|---|---:|---:|---:|---:|
{src_rows}

| split | documents | bytes | tokens |
|---|---:|---:|---:|
{split_rows}

Licences: the King James Bible text is public domain (outside the UK's Crown rights); the Python
documentation is under the PSF licence; the fortune files come from Debian's `fortunes` packages
(BSD fortune collection).

## Training
{s['steps']:,} steps of {a['batch']} x {a['seq_len']} tokens ({s['tokens_seen']:,} tokens seen, about
{s['tokens_seen'] / d['splits']['train']['tokens']:.1f} passes over the training tokens), AdamW (lr {a['lr']},
betas 0.9/0.95, weight decay {a['weight_decay']}), {a['warmup']} warm-up steps then cosine decay to
{a['min_lr_ratio']} x lr, gradient clip {a['grad_clip']}, bf16 autocast, seed {a['seed']}. Checkpoint kept:
step {s['best_step']} (lowest validation loss, {s['best_val_loss']}). Trained in {s['train_seconds']:.0f} s on
{s['device']} (torch {s['versions']['torch']}, transformers {s['versions']['transformers']}). Weights
stored in float16.
{copy_note}
## Held-out perplexity
Non-overlapping windows of the held-out token stream, every token after the first of each window
scored (bf16 autocast on the GPU):

| window (tokens) | perplexity | tokens scored |
|---:|---:|---:|
{ppl_rows}

## Reproduce
```
python scripts/build_corpus.py --out /work/corpus
python scripts/train_tiny_model.py tokenize --corpus /work/corpus --data DATA
python scripts/train_tiny_model.py train --data DATA --out OUT --steps {a['steps']} --batch {a['batch']} --seed {a['seed']} --copy-fraction {a.get('copy_fraction', 0.0)} --copy-spans {a.get('copy_spans', 1)} --copy-max-len {a.get('copy_max_len', 64)}
```
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="train the tokenizer and write token ids (CPU)")
    t.add_argument("--corpus", default="/work/corpus")
    t.add_argument("--data", required=True)
    t.add_argument("--vocab-size", type=int, default=8192)
    m = sub.add_parser("train", help="train the model (GPU)")
    m.add_argument("--data", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--steps", type=int, default=2000)
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--seq-len", type=int, default=2048)
    m.add_argument("--hidden", type=int, default=384)
    m.add_argument("--intermediate", type=int, default=896)
    m.add_argument("--layers", type=int, default=6)
    m.add_argument("--lr", type=float, default=2e-3)
    m.add_argument("--min-lr-ratio", type=float, default=0.1)
    m.add_argument("--warmup", type=int, default=100)
    m.add_argument("--weight-decay", type=float, default=0.1)
    m.add_argument("--grad-clip", type=float, default=1.0)
    m.add_argument("--eval-every", type=int, default=100)
    m.add_argument("--max-shard-size", default="15MB")
    m.add_argument("--copy-fraction", type=float, default=0.0,
                   help="fraction of training rows given a repeated span (teaches copying; 0 = off)")
    m.add_argument("--copy-spans", type=int, default=1, help="repeated spans per chosen row")
    m.add_argument("--copy-max-len", type=int, default=64, help="longest repeated span in tokens (shortest: 8)")
    m.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds: lower --steps to what fits, measured on the first steps (0 = off)")
    m.add_argument("--eval-tokens", type=int, default=0, help="cap on scored tokens (0 = all; smoke runs)")
    m.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "tokenize":
        tokenize(args.corpus, args.data, args.vocab_size)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
