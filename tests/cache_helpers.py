"""Tiny random-weight models of each supported family and teacher-forced decoding, for the cache tests."""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    # transformers imports triton; the Triton kernel tests collected after these need interpreter mode
    # to be on before triton's first import (their own setdefault would come too late)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

import kvpolar  # noqa: E402
from kvpolar.cache.cache import QuantizedKVCache  # registers attn_implementation="kvpolar"  # noqa: E402

VOCAB = 96
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
}


def tiny_model(family: str = "llama", layers: int = 2, kv_heads: int = 2, heads: int = 4, head_dim: int = 32,
               dtype: torch.dtype = torch.float32, seed: int = 0, **extra) -> transformers.PreTrainedModel:
    config_cls, model_cls, defaults = FAMILIES[family]
    config = config_cls(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=512, **{**defaults, **extra},
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    model.set_attn_implementation("kvpolar")
    return model


def config(preset: str, **changes) -> kvpolar.KVCacheConfig:
    return dataclasses.replace(kvpolar.KVCacheConfig.preset(preset), **changes)


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of ``lengths``, left-padded: ``(input_ids, attention_mask)`` ``[B, max]``."""
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, t in enumerate(lengths):
        ids[i, n - t:] = torch.randint(1, VOCAB, (t,), generator=gen)
        mask[i, n - t:] = 1
    return ids, mask


@torch.no_grad()
def teacher_forced(model, ids, mask, continuation, cache) -> torch.Tensor:
    """Logits ``[B, 1 + steps, V]`` (float32): after the prompt, then after each fed continuation
    token; position ids follow the attention mask (left padding)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = kvpolar.cache_kwargs(model, cache)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
    logits = [out.logits[:, -1].float()]
    for t in range(continuation.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        pos = mask.sum(-1, keepdim=True) - 1
        out = model(input_ids=continuation[:, t:t + 1], attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, dim=1)


def stock_logits(model, ids, mask, continuation) -> tuple[torch.Tensor, transformers.DynamicCache]:
    """The same teacher-forced run with ``sdpa`` and the stock ``DynamicCache``."""
    model.set_attn_implementation("sdpa")
    try:
        cache = transformers.DynamicCache(config=model.config)
        return teacher_forced(model, ids, mask, continuation, cache), cache
    finally:
        model.set_attn_implementation("kvpolar")


def continuation(batch: int, steps: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(seed))


__all__ = ["QuantizedKVCache", "config", "continuation", "left_padded", "stock_logits", "teacher_forced", "tiny_model"]


def memory_report_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One gloo rank: prefill a tiny Llama with KIVI-2, save local and summed-over-ranks reports."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # forked child: keep OpenMP's pool (not fork-safe) out of it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_model("llama", layers=2)
        ids, mask = left_padded([40 + 8 * rank])  # ranks hold different lengths: sums differ from 2x
        cache = QuantizedKVCache(model.config, config("kivi-2", residual_length=4))
        teacher_forced(model, ids, mask, ids[:, :0], cache)
        reports = (dataclasses.asdict(cache.memory_report()), dataclasses.asdict(cache.memory_report(True)))
        torch.save(reports, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
