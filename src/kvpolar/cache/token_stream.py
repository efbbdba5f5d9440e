"""Tokens handed to a ``transformers`` streamer while replayed decoding runs (:mod:`kvpolar.cache.graphed`).

A replayed step writes its tokens on the device. :class:`TokenStream` copies each step's tokens into
pinned host memory without waiting (on CUDA) and marks the copy with an event; after queueing a step,
the host waits for the copy of the step ``ahead`` steps back and hands the streamer every step whose
copy has landed, in order. So the host stays at most ``ahead`` steps in front of the GPU (which keeps
that many steps queued, never idle for a launch) and tokens reach the streamer one step after another
as the GPU makes them; without the wait the host would queue a whole stretch of replays at once and
the tokens would arrive a stretch at a time (measured on an H100: a median gap of 0.01 ms between
tokens and gaps of a second, `benchmarks/README.md`). Off CUDA the tokens are handed over as each step
makes them.

What the streamer sees is what ``generate`` hands its own streamer: the prompts ``[B, T]`` once, then
one int64 ``[B]`` tensor per step, in which a sequence that has finished (produced an end-of-sequence id
at an earlier step) shows the pad id, up to and including the step where the last sequence finished;
then ``end()``.
"""

from __future__ import annotations

from typing import Any

import torch


class TokenStream:
    """Hands a streamer (an object with ``put(tokens)`` and ``end()``, as ``transformers.TextStreamer``)
    the tokens of decode steps as they become readable on the host.

    Args:
        streamer: the streamer.
        batch: sequences decoded (``B``).
        capacity: steps this stream will carry at most (the pinned buffer's rows).
        device: where the steps write their tokens.
        eos_ids: end-of-sequence ids (a sequence finishes at its first); empty: none.
        pad_token_id: what a finished sequence shows afterwards.
        ahead: steps the host may queue before it waits for the oldest one's tokens (>= 1).
    """

    def __init__(self, streamer: Any, batch: int, capacity: int, device: torch.device, eos_ids: list[int],
                 pad_token_id: int, ahead: int = 2) -> None:
        if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 1:
            raise ValueError(f"ahead={ahead!r}; allowed: an int >= 1 (steps queued before the host waits)")
        for method in ("put", "end"):
            if not callable(getattr(streamer, method, None)):
                raise TypeError(f"streamer {type(streamer).__name__} has no {method}() method; a streamer takes "
                                "put(tokens) and end(), as transformers.TextStreamer")
        self.streamer = streamer
        self.asynchronous = torch.device(device).type == "cuda"
        # [steps, B]: each step's row contiguous, so a copy lands in it directly (no host-side temporary)
        self.host = torch.empty(capacity, batch, dtype=torch.long, pin_memory=self.asynchronous)
        self.events: list[torch.cuda.Event | None] = []  # one per step pushed, in order
        self.handed = 0  # steps already handed to the streamer
        self.eos = torch.tensor(eos_ids, dtype=torch.long)
        self.pad = int(pad_token_id)
        self.finished = torch.zeros(batch, dtype=torch.bool)  # (stays all False without end-of-sequence ids)
        self.ahead = ahead

    def prompt(self, input_ids: torch.Tensor) -> None:
        """The prompts ``[B, T]``, handed over first (as ``generate`` does; a streamer that skips the
        prompt counts on it)."""
        self.streamer.put(input_ids.cpu())

    def push(self, tokens: torch.Tensor, column: int | None = None) -> None:
        """The next step's tokens: int64 ``[B, 1]`` (``column`` None), or column ``column`` of ``tokens``
        ``[B, n]`` as it will be once the work queued so far has run (a replayed step's output). On
        CUDA the copy is queued; then the host waits for the step ``ahead`` back and hands over every
        step that has landed (:meth:`poll`)."""
        step = len(self.events)
        if step >= self.host.shape[0]:
            raise RuntimeError(f"TokenStream holds {self.host.shape[0]} steps; step {step + 1} pushed")
        source = tokens[:, 0] if column is None else tokens[:, column]
        self.host[step].copy_(source, non_blocking=self.asynchronous)
        event = None
        if self.asynchronous:
            event = torch.cuda.Event()
            event.record()
        self.events.append(event)
        while len(self.events) - self.handed > self.ahead:  # (the host no further than ``ahead`` steps in front)
            self._wait(self.handed)
            self._hand_next()
        self.poll()

    def poll(self) -> None:
        """Hand over, in order, every pushed step whose tokens have reached the host (no waiting)."""
        while self.handed < len(self.events):
            event = self.events[self.handed]
            if event is not None and not event.query():
                return
            self._hand_next()

    def flush(self) -> None:
        """Wait for every pushed step and hand it over."""
        while self.handed < len(self.events):
            self._wait(self.handed)
            self._hand_next()

    def end(self) -> None:
        """Every pushed step handed over, then the streamer's ``end()``."""
        self.flush()
        self.streamer.end()

    def _wait(self, step: int) -> None:
        event = self.events[step]
        if event is not None:
            event.synchronize()

    def _hand_next(self) -> None:
        self._hand(self.handed)
        self.events[self.handed] = None
        self.handed += 1

    def _hand(self, step: int) -> None:
        if bool(self.finished.all()):  # (``generate`` stops at the step where the last sequence finished)
            return
        raw = self.host[step]
        self.streamer.put(torch.where(self.finished, torch.full_like(raw, self.pad), raw))
        self.finished |= torch.isin(raw, self.eos)
