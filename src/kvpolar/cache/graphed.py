"""Decoding, greedy or sampled, with each decode step recorded once in a CUDA graph and replayed.

At small batches an eager decode step of a ``transformers`` model is bound by its host (Python, kernel
launches), not by the GPU: on an H100 an 8B-shaped model's step at 32k tokens took 25 ms with kvpolar and
19 ms in 16 bits at batch 1, for a few milliseconds of GPU work (benchmarks/README.md). A CUDA graph
replays a step's kernels without the Python that launched them.

A kvpolar cache changes shape in two ways: its 16-bit window grows by one token per step, and every
``chunk`` steps a chunk of the window moves into the packed part (new packed tensors). So the loop here
works in stretches, one per move: each quantized layer's window goes into buffers of a fixed size
(``QuantizedLayer.give_window_buffers``) whose write position and length live on the device; the
stretch's first step runs eagerly (it compiles and binds what the stretch launches), the second is
recorded in a CUDA graph, and the graph is replayed for the rest of the stretch, each replay advancing
the positions on the device; then the window goes back to the layers (``take_window_buffers``), the
chunk moves into the packed part as ``after_attention`` would have moved it, and the next stretch
records its own graph. The attention reads the window's length from memory
(``fused_decode_attention(..., residual_length=)``).

Layers kept in 16 bits (``full_precision_layers``, turbo-3's and turbo-k3v4's first and last two) take
buffers for the stretch's new tokens after their whole cache, which the fused kernel reads in place as
a full-precision packed part, and append them at the stretch's end.

Padded batches (left padding, ``attention_mask``): the padding stays masked through every step by a
mask over the columns each stretch's steps read, built once per stretch (the steps' own tokens are all
real), and each row's positions count its real tokens, as ``generate`` counts them.

Needs: full attention (no sliding windows: the steps attend every cached token but padding, and the
model's mask is not read), the quantized layers with one ``residual_length`` and chunk
(``KVCacheConfig.min_chunk`` sets how many steps a recording serves), formats the fused kernel reads,
and a model whose decode step reads nothing back to the host (a recording fails on such a read). With
``graphs=False`` the same stretches run eagerly (on any device; the CPU tests check the bookkeeping
against ``generate`` that way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch

from kvpolar.cache import attention
from kvpolar.cache.cache import QuantizedKVCache, cache_kwargs
from kvpolar.cache.layer import QuantizedLayer
from kvpolar.cache.token_stream import TokenStream


@dataclasses.dataclass(frozen=True)
class GraphedDecoding:
    """What :func:`decode_with_graphs` produced and how.

    ``tokens``: int64 ``[B, steps]``, the tokens chosen after the given ones; ``eager_steps``: decode
    steps run eagerly (one per stretch with graphs, all of them without); ``replayed_steps``: steps
    replayed from a recorded graph; ``recordings``: graphs recorded (one per stretch of two or more
    steps)."""

    tokens: torch.Tensor
    eager_steps: int
    replayed_steps: int
    recordings: int


@torch.no_grad()
def generate_with_graphs(model: Any, input_ids: torch.Tensor, cache: QuantizedKVCache, max_new_tokens: int, *,
                         eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                         do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, suppress_token_ids: Sequence[int] | None = None,
                         graphs: bool = True, streamer: Any = None,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Generation as ``model.generate(input_ids, attention_mask=..., max_new_tokens=..., do_sample=...,
    temperature=..., top_k=..., top_p=...)`` with a fresh kvpolar ``cache``, its decode steps replayed from CUDA graphs
    (module docstring): greedy, or sampled with ``generate``'s temperature, top-k and top-p warpers and
    ``torch.multinomial`` (seed with ``torch.manual_seed``: a replayed draw advances the generator as an
    eager one does, so the draws are ``generate``'s under the same seed; checked on an H100,
    ``benchmarks/bench_graphed_decode.py --sampling``).

    Args:
        model: a ``transformers`` causal LM with ``attn_implementation="kvpolar"`` (``kvpolar.enable``).
        input_ids: int64 ``[B, T]`` prompts, on the model's device (left-padded to one length where
            ``attention_mask`` says so).
        cache: an empty ``QuantizedKVCache`` for this model.
        max_new_tokens: tokens to generate (>= 1).
        eos_token_id: end-of-sequence id(s): a sequence finishes at its first; decoding stops once every
            sequence has finished (checked after each stretch), and the result ends, as ``generate``'s,
            at the step where the last one finished (the cache holds the rest of that stretch).
        pad_token_id: what a finished sequence's later tokens are set to (None: the first
            end-of-sequence id), as ``generate`` pads them.
        do_sample, temperature, top_k, top_p: as ``generate``'s (``top_k`` None or 0: no top-k; ``top_p``
            None or 1: no top-p); without ``do_sample`` the other three must keep their defaults.
        suppress_token_ids: token ids never chosen (their logits set to -inf before the warpers), as
            ``generate``'s ``suppress_tokens``; the end-of-sequence ids here give ``generate``'s
            ``min_new_tokens=max_new_tokens``.
        graphs: record and replay (CUDA); False runs the same steps eagerly.
        streamer: an object with ``put(tokens)`` and ``end()`` (``transformers.TextStreamer``), handed
            what ``generate`` hands its ``streamer``: the prompts, each step's tokens (finished sequences
            padded), then ``end()``; each replayed step's tokens as their copy to the host lands, the
            host kept two steps in front of the GPU (:mod:`kvpolar.cache.token_stream`).
        attention_mask: ``[B, T]`` ones for real tokens, zeros for padding (int or bool, as the
            tokenizer returns it; None: no padding), as ``generate``'s: padding is never attended and
            each row's positions count its real tokens.
    Returns:
        int64 ``[B, T + n]``: the prompts, then ``n <= max_new_tokens`` generated tokens.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be an int64 [batch, tokens] tensor; got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}")
    _check_request(model, cache, max_new_tokens, graphs, input_ids)
    valid = _padding(attention_mask, input_ids)
    choose = token_chooser(do_sample, temperature, top_k, top_p, suppress_token_ids)
    eos_ids = _eos_ids(eos_token_id)
    if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral)
                                     or pad_token_id < 0):
        raise ValueError(f"pad_token_id={pad_token_id!r}; allowed: None or a token id (an int >= 0)")
    if cache.get_seq_length() != 0:
        raise ValueError(f"cache holds {cache.get_seq_length()} tokens; generate_with_graphs fills an empty cache "
                         "(call cache.reset() or build a new one)")
    pad = (eos_ids[0] if eos_ids else 0) if pad_token_id is None else int(pad_token_id)
    stream = None
    if streamer is not None:
        stream = TokenStream(streamer, input_ids.shape[0], max_new_tokens, input_ids.device, eos_ids, pad)
        stream.prompt(input_ids)
    prompt = {}
    if valid is not None:  # (the mask and positions generate passes the prompt)
        prompt = dict(attention_mask=attention_mask.to(input_ids.device), position_ids=prompt_positions(valid))
    logits = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **prompt, **cache_kwargs(model, cache)).logits
    first = choose(logits[:, -1])
    if stream is not None:
        stream.push(first)
    tokens = first
    if max_new_tokens > 1:
        finished = bool(torch.isin(first, torch.tensor(eos_ids, device=first.device)).all()) if eos_ids else False
        if not finished:
            rest = _decode_stretches(model, cache, first, input_ids.shape[1], max_new_tokens - 1, eos_ids, choose,
                                     graphs, stream, valid)
            tokens = torch.cat([first, rest.tokens], dim=1)
    if eos_ids:
        tokens = _finish_at_eos(tokens, eos_ids, pad)
    if stream is not None:
        stream.end()
    return torch.cat([input_ids, tokens], dim=1)


@torch.no_grad()
def decode_with_graphs(model: Any, cache: QuantizedKVCache, next_ids: torch.Tensor, position: int, steps: int, *,
                       eos_token_id: int | Sequence[int] | None = None, do_sample: bool = False, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None,
                       suppress_token_ids: Sequence[int] | None = None, graphs: bool = True,
                       streamer: Any = None, attention_mask: torch.Tensor | None = None) -> GraphedDecoding:
    """``steps`` decode steps (greedy, or sampled as :func:`generate_with_graphs` says) over a kvpolar
    ``cache`` that holds the prompt (and perhaps earlier steps), the first step feeding ``next_ids``
    (int64 ``[B, 1]``) at position ``position`` (the tokens the cache holds); in stretches recorded
    once and replayed (module docstring). Returns the tokens each step produced (fewer than ``steps``
    if every sequence produced one of ``eos_token_id``'s ids, checked after each stretch) and how they
    were run.
    The cache ends as after as many eager steps. ``streamer``: as :func:`generate_with_graphs`' (each
    step's tokens, finished sequences showing the first end-of-sequence id, then ``end()``; no prompt).
    ``attention_mask``: ``[B, position]``, ones for the real tokens the cache holds and zeros for
    padding (needed where the cache holds padding); each row's first step then takes the position
    of its count of real tokens."""
    if not isinstance(next_ids, torch.Tensor) or next_ids.dtype != torch.long or next_ids.dim() != 2 \
            or next_ids.shape[1] != 1:
        raise ValueError(f"next_ids must be int64 [batch, 1]; got {getattr(next_ids, 'dtype', None)} "
                         f"{tuple(getattr(next_ids, 'shape', ()))}")
    _check_request(model, cache, steps, graphs, next_ids)
    valid = _padding(attention_mask, next_ids, position)
    choose = token_chooser(do_sample, temperature, top_k, top_p, suppress_token_ids)
    eos_ids = _eos_ids(eos_token_id)
    stream = None if streamer is None else TokenStream(streamer, next_ids.shape[0], steps, next_ids.device, eos_ids,
                                                       eos_ids[0] if eos_ids else 0)
    run = _decode_stretches(model, cache, next_ids, position, steps, eos_ids, choose, graphs, stream, valid)
    if stream is not None:
        stream.end()
    return run


def _decode_stretches(model: Any, cache: QuantizedKVCache, next_ids: torch.Tensor, position: int, steps: int,
                      eos_ids: list[int], choose: Callable[[torch.Tensor], torch.Tensor], graphs: bool,
                      stream: TokenStream | None, valid: torch.Tensor | None = None) -> GraphedDecoding:
    """:func:`decode_with_graphs` once its arguments are checked: ``choose`` picks each step's tokens
    (:func:`token_chooser`), ``stream`` (or None) gets each step's tokens as they are made; ``valid``:
    bool ``[B, position]``, the cached tokens that are real, for a batch with padding (else None)."""
    quantized, full = _window_layers(cache, position, valid is not None)
    first = quantized[0]
    keep, chunk = first.residual_length, first.chunk
    fused = attention.fused_kernel(next_ids)  # (the module the layers' attention will call, or None)
    if fused is not None and keep + chunk > fused.MAX_FOLDED_WINDOW:
        raise ValueError(f"residual_length + chunk = {keep} + {chunk} window tokens; the fused kernel reads a window's "
                         f"length from memory for windows of at most MAX_FOLDED_WINDOW={fused.MAX_FOLDED_WINDOW} "
                         "tokens: lower residual_length or min_chunk")
    device = next_ids.device
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    kw = cache_kwargs(model, cache)
    ids = next_ids.clone()
    pos = torch.full_like(ids, position) if valid is None else valid.sum(-1, keepdim=True).to(ids.dtype)
    out = torch.empty(ids.shape[0], steps, dtype=torch.long, device=device)
    slot = torch.zeros(1, dtype=torch.long, device=device)
    # where the step's token goes and how many window tokens it attends: the quantized layers' windows
    # start with the tokens they hold, the 16-bit layers' with none (their cache is read before them)
    index, length = torch.zeros(2, 1, dtype=torch.long, device=device), torch.zeros(2, 1, dtype=torch.int32,
                                                                                   device=device)

    def step() -> None:
        logits = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **kw).logits
        chosen = choose(logits[:, -1])
        out.index_copy_(1, slot, chosen)
        ids.copy_(chosen)
        for counter in (pos, slot, index, length):
            counter.add_(1)

    done = eager = replayed = recordings = 0
    # (recordings are made on the current device: the inputs' one)
    with torch.cuda.device(device) if graphs else contextlib.nullcontext():
        while done < steps:
            window = first.residual_tokens
            stretch = min(keep + chunk - window, steps - done)  # steps until the window's next move
            index[0].fill_(window)
            length[0].fill_(window + 1)
            index[1].fill_(0)
            length[1].fill_(1)
            masks = (None, None) if valid is None else (_stretch_mask(valid, keep + chunk - window),
                                                        _stretch_mask(valid, stretch))
            for layer in quantized:
                layer.give_window_buffers(keep + chunk, index[0], length[0], masks[0])
            for layer in full:
                layer.give_window_buffers(stretch, index[1], length[1], masks[1])
            try:
                step()
                eager += 1
                if stream is not None:
                    stream.push(out, done)
                if stretch > 1 and graphs:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):  # (its own memory pool, freed with it after the stretch)
                        step()
                    recordings += 1
                    for j in range(1, stretch):
                        graph.replay()
                        if stream is not None:  # (queued after the replay: the step's tokens as it wrote them)
                            stream.push(out, done + j)
                    replayed += stretch - 1
                    del graph
                else:
                    for j in range(1, stretch):
                        step()
                        if stream is not None:
                            stream.push(out, done + j)
                    eager += stretch - 1
            except BaseException:
                for layer in (*quantized, *full):  # (the cache no longer matches the tokens: build a new one)
                    layer.window_buffers = None
                raise
            for layer in (*quantized, *full):
                layer.take_window_buffers(stretch)
            if valid is not None:
                valid = _real_after(valid, stretch)
            done += stretch
            if stream is not None:
                stream.flush()
            if eos is not None and bool(torch.isin(out[:, :done], eos).any(-1).all()):
                break
    return GraphedDecoding(out[:, :done], eager, replayed, recordings)


def token_chooser(do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None,
                  suppress_token_ids: Sequence[int] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``choose(logits [B, V]) -> int64 [B, 1]``: the argmax, or (``do_sample``) a token drawn as
    ``generate`` draws it: the logits in float32 through its temperature, top-k and top-p warpers (in
    that order), softmax, ``torch.multinomial``; ``suppress_token_ids`` first set to -inf, as
    ``generate``'s ``suppress_tokens`` (and ``min_new_tokens``, for end-of-sequence ids). Only device
    operations, so a CUDA graph records them (the draws advance the recorded generator state at each
    replay, as eager draws do); the suppressed ids go to the device at the first, eager, call."""
    suppressed = _token_ids(suppress_token_ids)
    if not do_sample:
        if temperature != 1.0 or top_k not in (None, 0) or top_p not in (None, 1.0):
            raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p} shape sampling; pass "
                             "do_sample=True (greedy decoding takes the argmax)")
        warpers: list = []
    else:
        warpers = _warpers(temperature, top_k, top_p)
    on_device: dict[torch.device, torch.Tensor] = {}

    def choose(logits: torch.Tensor) -> torch.Tensor:
        if suppressed:
            ids = on_device.get(logits.device)
            if ids is None:
                ids = on_device[logits.device] = torch.tensor(suppressed, dtype=torch.long, device=logits.device)
            logits = logits.index_fill(-1, ids, float("-inf"))
        if not do_sample:
            return logits.argmax(-1, keepdim=True)
        scores = logits.to(torch.float32)
        for warper in warpers:
            scores = warper(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)

    return choose


def _token_ids(ids: Sequence[int] | int | None) -> list[int]:
    """``suppress_token_ids`` as a list of non-negative ints (an int alone: one id; None: none)."""
    if ids is None:
        return []
    listed = [ids] if isinstance(ids, numbers.Integral) and not isinstance(ids, bool) else ids
    if isinstance(listed, (str, bytes)) or not isinstance(listed, Iterable) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in listed):
        raise ValueError(f"suppress_token_ids={ids!r}; allowed: None, or token ids (ints >= 0)")
    return [int(i) for i in listed]


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """``eos_token_id`` (None, an id, or ids) as a list of ids, checked as ``eos_token_id``."""
    try:
        return _token_ids(eos_token_id)
    except ValueError:
        raise ValueError(f"eos_token_id={eos_token_id!r}; allowed: None, a token id or token ids (ints >= 0)") from None


def _warpers(temperature: float, top_k: int | None, top_p: float | None) -> list:
    """``generate``'s temperature, top-k and top-p warpers, in its order, for these settings."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r}; allowed: a number > 0")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r}; allowed: None or an int >= 0 (0: no top-k)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}; allowed: None or a number in (0, 1]")
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=float(top_p)))
    return warpers


def _check_request(model: Any, cache: Any, steps: int, graphs: bool, inputs: torch.Tensor) -> None:
    """The request's refusals; ``inputs``: the token ids, on the device the steps run on."""
    device = inputs.device
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"cache must be a kvpolar QuantizedKVCache; got {type(cache).__name__}")
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl != "kvpolar":
        raise ValueError(f"the model's attn_implementation is {impl!r}; replayed decoding needs 'kvpolar' "
                         "(kvpolar.enable(model, ...))")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    sliding = getattr(text, "sliding_window", None)
    layer_types = set(getattr(text, "layer_types", None) or ())
    if sliding is not None or layer_types - {"full_attention"}:
        raise ValueError(f"the model has sliding-window attention (sliding_window={sliding}, layer types "
                         f"{sorted(layer_types)}); replayed decoding attends every cached token and takes "
                         "full-attention models only")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"the number of tokens to generate must be an int >= 1; got {steps!r}")
    if graphs:
        if torch.device(device).type != "cuda":
            raise ValueError(f"graphs=True records CUDA graphs; the inputs are on {device} (graphs=False runs the "
                             "same steps eagerly)")
        if attention.fused_kernel(inputs) is None:
            raise ValueError("graphs=True needs the fused decode kernel, which needs triton")


def _padding(attention_mask: torch.Tensor | None, ids: torch.Tensor, tokens: int | None = None) -> torch.Tensor | None:
    """``attention_mask`` (``[B, tokens]``, ``tokens`` = the prompts' length by default; ones and zeros,
    int or bool) as bool on ``ids``' device where it holds padding; None where it is None or all ones."""
    if attention_mask is None:
        return None
    tokens = ids.shape[1] if tokens is None else tokens
    shape = (ids.shape[0], tokens)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != shape \
            or attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(f"attention_mask must be an int or bool [batch, tokens] = {list(shape)} tensor; got "
                         f"{getattr(attention_mask, 'dtype', type(attention_mask).__name__)} "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    valid = attention_mask.to(ids.device) != 0
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold ones (real tokens) and zeros (padding) only")
    if not bool(valid.any(-1).all()):
        raise ValueError(f"attention_mask rows {valid.any(-1).logical_not().nonzero().flatten().tolist()} hold "
                         "padding only; every row needs a real token")
    return None if bool(valid.all()) else valid


def prompt_positions(valid: torch.Tensor) -> torch.Tensor:
    """int64 ``[B, T]`` positions of prompts whose real tokens ``valid`` (bool ``[B, T]``) marks, as
    ``generate`` derives them from the attention mask: each row counts its real tokens from 0, padding
    at 0."""
    return (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)


def _real_after(valid: torch.Tensor, new: int) -> torch.Tensor:
    """bool ``[B, T + new]``: ``valid`` ``[B, T]`` (the tokens that are real) then ``new`` real ones."""
    return torch.cat([valid, valid.new_ones(valid.shape[0], new)], dim=-1)


def _stretch_mask(valid: torch.Tensor, new: int) -> torch.Tensor:
    """bool ``[B, 1, 1, T + new]``: ``valid`` ``[B, T]`` (the cached tokens that are real) then ``new``
    real columns, the buffers' room beyond the cached tokens (the stretch's tokens)."""
    return _real_after(valid, new)[:, None, None, :]


def _window_layers(cache: QuantizedKVCache, position: int,
                   padded: bool = False) -> tuple[list[QuantizedLayer], list[QuantizedLayer]]:
    """The cache's (quantized, 16-bit) layers, checked for replayed decoding: at least one quantized,
    those with one window length, residual length and chunk, every layer with ``position`` tokens
    seen, padding only where the caller has its mask (``padded``)."""
    layers = list(cache.layers)
    if any(not layer.is_initialized or layer.keys is None for layer in layers):
        raise ValueError("the cache holds no prompt: fill it first (generate_with_graphs does)")
    quantized = [layer for layer in layers if not layer.plan.full_precision]
    full = [layer for layer in layers if layer.plan.full_precision]
    if not quantized:
        raise ValueError("every layer keeps a 16-bit cache; replayed decoding works in stretches between the "
                         "quantized layers' moves into their packed parts: use generate()")
    shapes = {(layer.residual_length, layer.chunk, layer.residual_tokens) for layer in quantized}
    if len(shapes) != 1:
        raise ValueError(f"the quantized layers differ in (residual_length, chunk, window tokens): {sorted(shapes)}; "
                         "replayed decoding needs them equal")
    seen = {layer.seen for layer in layers}
    if seen != {position}:
        raise ValueError(f"position={position}, but the cache's layers hold {sorted(seen)} tokens")
    if not padded and any(layer.residual_valid is not None for layer in layers):
        raise ValueError("the cache holds padding: pass the prompts' attention_mask, which says where")
    return quantized, full


def _finish_at_eos(tokens: torch.Tensor, eos_ids: list[int], pad_token_id: int) -> torch.Tensor:
    """``tokens`` ``[B, n]`` as ``generate`` returns them: every token after a row's first end-of-sequence
    id set to ``pad_token_id``, and, once every row has finished, cut after the step where the last
    one did (``[B, m]``, ``m <= n``)."""
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, dtype=tokens.dtype, device=tokens.device))
    after = is_eos.long().cumsum(-1) - is_eos.long() > 0
    tokens = torch.where(after, torch.full_like(tokens, pad_token_id), tokens)
    if bool(is_eos.any(-1).all()):
        last = int(is_eos.long().argmax(-1).max())  # (argmax: each row's first end-of-sequence token)
        tokens = tokens[:, :last + 1]
    return tokens
