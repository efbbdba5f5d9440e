"""``model.generate(..., custom_generate=kvpolar.replayed_decoding)``: ``generate()`` itself, its decode
steps replayed from CUDA graphs (:mod:`kvpolar.cache.graphed`).

``transformers``' ``generate`` takes a callable as ``custom_generate``: it prepares the inputs, the
generation config, the logits processors and the stopping criteria as usual, then hands them to the
callable instead of its own decoding loop. :func:`replayed_decoding` reads what ``generate`` prepared,
refuses (with the setting's name) what a recorded step cannot do, and decodes with
:func:`kvpolar.cache.graphed.generate_with_graphs`: the same tokens, greedy or sampled under one seed,
with ``generate``'s end-of-sequence handling (finished rows padded, the result cut where the last row
finished).

What a recorded step does: greedy choice or sampling with temperature, top-k and top-p;
``suppress_tokens``; a ``min_new_tokens`` / ``min_length`` that covers every new token (end-of-sequence
ids suppressed throughout); end-of-sequence ids, one or several. Refused: any other logits processor
(repetition penalty, bad words, ...: they read the growing sequence or are not written for recording),
stopping criteria other than the length and end-of-sequence ones, beam search, a prefill in chunks
(``prefill_chunk_size``), ``return_dict_in_generate`` and the outputs it brings. Padded batches (an
``attention_mask`` with zeros, left padding) decode as ``generate`` decodes them.

Streaming: ``generate`` hands a ``custom_generate`` callable neither its ``streamer`` nor ``synced_gpus``
(transformers 5.17 and 5.25 drop both before the call, after giving the streamer the prompts), so a
streamer goes in as ``token_streamer=`` (a keyword of this callable, which ``generate`` passes on); it
gets what ``generate``'s own streamer would, replayed steps' tokens as their copies reach the host
(:mod:`kvpolar.cache.token_stream`). ``streamer=`` with this callable is refused, by name, rather than
left with the prompts alone.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from kvpolar.cache.cache import QuantizedKVCache
from kvpolar.cache.graphed import _token_ids, generate_with_graphs, prompt_positions

#: logits processors a recorded step reproduces (by class name, as transformers names them)
REPLAYED_PROCESSORS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
                       "SuppressTokensLogitsProcessor", "MinLengthLogitsProcessor",
                       "MinNewTokensLengthLogitsProcessor")
#: stopping criteria it honours
REPLAYED_CRITERIA = ("MaxLengthCriteria", "EosTokenCriteria")
#: model keywords ``generate`` prepares that replayed decoding reads (``attention_mask``) or may ignore
#: (their values checked below; ``position_ids`` must be those the mask gives, which it recomputes)
_PREPARED_KEYWORDS = {"attention_mask", "use_cache", "logits_to_keep", "position_ids", "cache_position",
                      "output_attentions", "output_hidden_states"}


def replayed_decoding(model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                      generation_config: Any, synced_gpus: bool = False, streamer: Any = None,
                      graphs: bool | None = None, token_streamer: Any = None, **model_kwargs: Any) -> torch.Tensor:
    """The decoding loop ``generate`` calls as ``custom_generate`` (not called directly)::

        cache = kvpolar.enable(model, "kivi-2", min_chunk=128)
        out = model.generate(ids, max_new_tokens=256, **kvpolar.cache_kwargs(model, cache),
                             custom_generate=kvpolar.replayed_decoding)

    Args (``generate`` passes them): the model, the prompts ``input_ids`` int64 ``[B, T]``, the
    prepared logits processors and stopping criteria, the generation config, ``synced_gpus`` and
    ``streamer`` (refused if given), and the model keywords, among them the kvpolar cache (``cache`` or
    ``past_key_values``; an empty ``QuantizedKVCache``). Keywords of ``generate``'s call for this
    callable: ``graphs``: record and replay (default: where the model is on CUDA), or False: the same
    stretches eagerly; ``token_streamer``: a streamer (``put`` / ``end``, as ``transformers.TextStreamer``)
    that gets the prompts, each step's tokens and ``end()``, as ``generate``'s ``streamer`` would.
    Returns:
        int64 ``[B, T + n]``, as ``generate``: the prompts, then ``n <= max_new_tokens`` new tokens.
    """
    cache = model_kwargs.pop("cache", None)
    if cache is None:
        cache = model_kwargs.pop("past_key_values", None)
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"custom_generate=kvpolar.replayed_decoding decodes over a kvpolar QuantizedKVCache; got "
                        f"{type(cache).__name__} (pass **kvpolar.cache_kwargs(model, cache) to generate)")
    if streamer is None:
        streamer = _streamer_given_to_generate()
    _refuse_settings(generation_config, synced_gpus, streamer, model_kwargs)
    given_on = input_ids.device  # (generate takes prompts on the CPU for a model on a GPU, and answers there)
    input_ids = input_ids.to(getattr(model, "device", given_on))
    max_new_tokens = _max_new_tokens(stopping_criteria, generation_config, input_ids.shape[1])
    eos_ids = _eos_ids(stopping_criteria, generation_config)
    sampling = _sampling(logits_processor, generation_config, input_ids.shape[1], max_new_tokens)
    suppressed = sampling.pop("suppress_token_ids")
    if sampling.pop("suppress_eos"):
        suppressed = sorted(set(suppressed) | set(eos_ids))
    pad = getattr(generation_config, "pad_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    if graphs is None:
        graphs = input_ids.device.type == "cuda"
    out = generate_with_graphs(model, input_ids, cache, max_new_tokens, eos_token_id=eos_ids or None,
                               pad_token_id=None if pad is None else int(pad), suppress_token_ids=suppressed or None,
                               graphs=graphs, streamer=token_streamer, attention_mask=model_kwargs.get("attention_mask"),
                               **sampling)
    return out.to(given_on)


def _streamer_given_to_generate() -> Any:
    """The ``streamer`` of the ``generate`` call that called :func:`replayed_decoding`, read from its
    frame (``generate`` does not pass it on), or None where no such frame is found within a few callers."""
    frame = inspect.currentframe()
    try:
        for _ in range(8):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            names = frame.f_code.co_varnames
            if frame.f_code.co_name == "generate" and "custom_generate" in names and "streamer" in names:
                return frame.f_locals.get("streamer")
        return None
    finally:
        del frame


def _refuse_settings(generation_config: Any, synced_gpus: bool, streamer: Any, model_kwargs: dict) -> None:
    """The generation settings and model keywords a recorded step cannot honour, each refused by name."""
    if synced_gpus:
        raise ValueError("synced_gpus=True (DeepSpeed ZeRO-3 / FSDP) is not supported by replayed decoding")
    if streamer is not None:
        raise ValueError("streamer= is not supported with custom_generate=kvpolar.replayed_decoding (transformers "
                         "5.17-5.25 keep it from custom_generate callables): pass the streamer as token_streamer=")
    beams = getattr(generation_config, "num_beams", 1) or 1
    if beams > 1:
        raise ValueError(f"num_beams={beams}; replayed decoding is greedy or sampled (num_beams=1)")
    chunk = getattr(generation_config, "prefill_chunk_size", None)
    if chunk:
        raise ValueError(f"prefill_chunk_size={chunk} is not supported by replayed decoding (it prefills the "
                         "prompts in one step): unset it, or drop custom_generate")
    for name in ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                 "output_hidden_states"):
        if getattr(generation_config, name, False):
            raise ValueError(f"{name}=True is not supported by replayed decoding (it returns the token ids only)")
    unknown = sorted(k for k, v in model_kwargs.items() if k not in _PREPARED_KEYWORDS and v is not None)
    if unknown:
        raise ValueError(f"model keywords {unknown} are not passed to the replayed steps; replayed decoding takes "
                         "token ids, an attention mask and a kvpolar cache")
    _check_positions(model_kwargs.get("position_ids"), model_kwargs.get("attention_mask"))
    if model_kwargs.get("use_cache") is False:
        raise ValueError("use_cache=False; replayed decoding decodes over the kvpolar cache")
    for name in ("output_attentions", "output_hidden_states"):
        if model_kwargs.get(name):
            raise ValueError(f"{name}=True is not supported by replayed decoding")


def _check_positions(position_ids: Any, attention_mask: Any) -> None:
    """``position_ids`` as ``generate`` prepares them (counting each row's real tokens from 0, padding at 0;
    ``0 .. T-1`` without a mask), or None; others are refused (the replayed steps count positions so)."""
    if position_ids is None:
        return
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        raise ValueError(f"position_ids {tuple(getattr(position_ids, 'shape', ()))}: replayed decoding takes the "
                         "[batch, tokens] positions generate derives from the attention mask")
    tokens = position_ids.shape[-1]
    if attention_mask is not None and tuple(getattr(attention_mask, "shape", ())) != tuple(position_ids.shape):
        raise ValueError(f"attention_mask {tuple(getattr(attention_mask, 'shape', ()))} and position_ids "
                         f"{tuple(position_ids.shape)} differ in shape; replayed decoding takes both as [batch, tokens] "
                         "of the prompts")
    if attention_mask is None:
        want = torch.arange(tokens, device=position_ids.device)[None, :]
    else:
        want = prompt_positions(attention_mask.to(position_ids.device) != 0)
    if want.shape[-1] != tokens or not bool((position_ids == want).all()):
        raise ValueError("position_ids other than those the attention mask gives (each row counting its real "
                         "tokens from 0) are not supported by replayed decoding")


def _max_new_tokens(stopping_criteria: Any, generation_config: Any, prompt_tokens: int) -> int:
    """New tokens to generate: the length criterion's ``max_length`` (``generate`` sets it from
    ``max_new_tokens``) less the prompt; criteria other than length and end-of-sequence refused."""
    max_length = getattr(generation_config, "max_length", None)
    for criterion in stopping_criteria or ():
        name = type(criterion).__name__
        if name not in REPLAYED_CRITERIA:
            raise ValueError(f"stopping criterion {name} is not supported by replayed decoding (supported: "
                             f"{', '.join(REPLAYED_CRITERIA)}: max_new_tokens / max_length and eos_token_id)")
        if name == "MaxLengthCriteria":
            max_length = criterion.max_length
    if max_length is None or max_length <= prompt_tokens:
        raise ValueError(f"max_length={max_length} for prompts of {prompt_tokens} tokens; set max_new_tokens >= 1")
    return int(max_length) - prompt_tokens


def _eos_ids(stopping_criteria: Any, generation_config: Any) -> list[int]:
    """The end-of-sequence ids ``generate`` stops at: its end-of-sequence criterion's, else the config's."""
    for criterion in stopping_criteria or ():
        if type(criterion).__name__ == "EosTokenCriteria":
            return _id_list(criterion.eos_token_id)
    return _id_list(getattr(generation_config, "eos_token_id", None))


def _id_list(ids: Any) -> list[int]:
    """Token ids given as None, an int, a list or a tensor, as a list of ints (``graphed._token_ids``)."""
    return _token_ids(ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids)


def _sampling(logits_processor: Any, generation_config: Any, prompt_tokens: int, max_new_tokens: int) -> dict:
    """``generate_with_graphs``' sampling keywords from the processors ``generate`` prepared (every other
    processor refused by name): do_sample, temperature, top_k, top_p, suppress_token_ids, and whether
    a minimum length suppresses the end-of-sequence ids throughout (``suppress_eos``)."""
    out: dict = {"do_sample": bool(getattr(generation_config, "do_sample", False)), "suppress_token_ids": [],
                 "suppress_eos": False}
    for processor in logits_processor or ():
        name = type(processor).__name__
        if name not in REPLAYED_PROCESSORS:
            raise ValueError(f"logits processor {name} is not supported by replayed decoding (supported: "
                             f"{', '.join(REPLAYED_PROCESSORS)}): unset the generation setting that adds it, or "
                             "drop custom_generate")
        if name == "TemperatureLogitsWarper":
            out["temperature"] = float(processor.temperature)
        elif name == "TopKLogitsWarper":
            out["top_k"] = int(processor.top_k)
        elif name == "TopPLogitsWarper":
            if getattr(processor, "min_tokens_to_keep", 1) != 1:
                raise ValueError(f"top-p with min_tokens_to_keep={processor.min_tokens_to_keep} is not supported by "
                                 "replayed decoding (1 only)")
            out["top_p"] = float(processor.top_p)
        elif name == "SuppressTokensLogitsProcessor":
            out["suppress_token_ids"] += _id_list(processor.suppress_tokens)
        else:  # a minimum length: replayed where it covers every new token
            if name == "MinLengthLogitsProcessor":
                minimum = int(processor.min_length) - prompt_tokens
                setting = f"min_length={processor.min_length} (min_new_tokens={minimum})"
            else:
                minimum = int(processor.min_new_tokens)
                setting = f"min_new_tokens={processor.min_new_tokens}"
            if minimum >= max_new_tokens:
                out["suppress_eos"] = True
            elif minimum > 0:
                raise ValueError(f"{setting} stops {minimum} of {max_new_tokens} new tokens from ending a sequence; "
                                 "replayed decoding takes a minimum of 0 or of every new token")
    if not out["do_sample"] and any(k in out for k in ("temperature", "top_k", "top_p")):
        raise ValueError("sampling warpers without do_sample=True")  # (generate adds none then)
    return out
