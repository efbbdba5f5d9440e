"""The interface every quantization method implements."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import torch

from kvpolar.kernels import cuda_dequantize_into
from kvpolar.quantized import QuantizedTensor
from kvpolar.validation import check_float_tensor


class Quantizer(abc.ABC):
    """A KV-cache quantization method with fixed parameters.

    Subclasses set ``name`` (the registry key), ``Config`` (a frozen dataclass validating its
    parameters in ``__post_init__``), ``stored_type`` (its ``QuantizedTensor`` subclass) and
    ``context_keys`` (keyword context ``quantize`` accepts, e.g. ``{"queries"}``), and implement
    ``_quantize`` / ``_dequantize``; methods with a fast score path override ``_scores``.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    stored_type: ClassVar[type[QuantizedTensor]]
    context_keys: ClassVar[frozenset[str]] = frozenset()
    #: Context keys without which ``quantize`` refuses to run.
    required_context: ClassVar[frozenset[str]] = frozenset()
    #: Config field -> attribute of the stored form that must equal it for this quantizer to read
    #: the tensor (e.g. ``{"bits": "bits"}``); checked by ``dequantize``/``scores``/``weighted_sum``.
    stored_params: ClassVar[dict[str, str]] = {}
    #: Whether ``kvpolar.kernels.dequantize`` rebuilds this method's stored form as ``dequantize``
    #: does; ``dequantize_into`` then runs that kernel on CUDA.
    dequantize_kernel: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        known = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise TypeError(
                f"quantizer {self.name!r} got unknown parameter(s) {unknown}; "
                f"allowed: {sorted(known)}"
            )
        self.config = self.Config(**params)

    # ----- public API ------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, **context: Any) -> QuantizedTensor:
        """Quantize ``x``: ``[..., T, D]``, float16/bfloat16/float32, CPU or CUDA.

        ``context`` carries what some methods need (e.g. ``queries=`` for SQuat). ``x`` must hold at
        least one token (the stored formats have no empty form; a cache quantizes whole chunks).
        """
        check_float_tensor("x", x)
        if x.numel() == 0:
            raise ValueError(f"x has shape {tuple(x.shape)}: nothing to quantize; allowed: at least one token "
                             "(T >= 1) and no empty leading dimension")
        unexpected = sorted(set(context) - self.context_keys)
        if unexpected:
            accepted = sorted(self.context_keys) or "none"
            raise TypeError(
                f"quantizer {self.name!r} got unexpected context {unexpected}; accepted: {accepted}"
            )
        missing = sorted(k for k in self.required_context if context.get(k) is None)
        if missing:
            raise ValueError(f"quantizer {self.name!r} needs context {missing} (e.g. queries=...)")
        self.check_head_dim(x.shape[-1])
        return self._quantize(x, **context)

    def dequantize(self, p: QuantizedTensor) -> torch.Tensor:
        """Reconstruct ``[..., T, D]`` in the original dtype, on ``p``'s device."""
        self._check_stored(p)
        return self._dequantize(p)

    def dequantize_into(self, p: QuantizedTensor, out: torch.Tensor) -> torch.Tensor:
        """Write the reconstruction of ``p`` into ``out`` and return ``out``.

        ``out``: ``[..., T, D]`` with ``p``'s shape and device, any floating dtype and strides (e.g.
        the first ``T`` tokens of a larger buffer). On CUDA, methods with a Triton kernel
        (``dequantize_kernel``, ``kvpolar.kernels.dequantize``: every built-in method, in the stored
        settings that kernel reads) write it directly, rounding once from float32; the others (and
        every method on the CPU) copy :meth:`dequantize`'s result.
        """
        self._check_stored(p)
        if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
            raise TypeError(f"out must be a floating-point tensor; got {getattr(out, 'dtype', type(out))}")
        if tuple(out.shape) != tuple(p.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}; the quantized tensor has {tuple(p.shape)}")
        if out.device != p.device:
            raise ValueError(f"out is on {out.device}; the quantized tensor is on {p.device}")
        self._dequantize_into(p, out)
        return out

    def scores(self, q: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        """Query-key scores ``q @ dequantize(p)^T`` as float32, ``[..., Tq, T]``.

        ``q`` is ``[..., Tq, D]`` with the leading shape of ``p``, or GQA-grouped: leading shape
        ``[..., Hq, Tq, D]`` against ``p``'s ``[..., Hkv, T, D]`` with ``Hq`` a multiple of ``Hkv``
        (query head ``h`` reads KV head ``h // (Hq // Hkv)``, as Hugging Face's ``repeat_kv``).
        """
        self._check_stored(p)
        check_float_tensor("q", q)
        if q.shape[-1] != p.head_dim:
            raise ValueError(f"q has head dim {q.shape[-1]}; the quantized tensor has {p.head_dim}")
        lead_q, lead_p = tuple(q.shape[:-2]), tuple(p.shape[:-2])
        if lead_q == lead_p:
            return self._scores(q, p)
        group = _gqa_group(lead_q, lead_p, "q")
        tq = q.shape[-2]
        out = self._scores(q.reshape(*lead_p, group * tq, q.shape[-1]), p)
        return out.reshape(*lead_q, tq, p.num_tokens)

    def weighted_sum(self, weights: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        """Attention-weighted sum of the stored vectors, ``weights @ dequantize(p)``, float32.

        ``weights`` is ``[..., Tq, T]`` (leading shape of ``p``, or GQA-grouped as in
        :meth:`scores`); returns ``[..., Tq, D]``. Methods with a fast path never rebuild ``p``.
        """
        self._check_stored(p)
        check_float_tensor("weights", weights)
        if weights.shape[-1] != p.num_tokens:
            raise ValueError(
                f"weights cover {weights.shape[-1]} tokens; the quantized tensor has {p.num_tokens}"
            )
        lead_w, lead_p = tuple(weights.shape[:-2]), tuple(p.shape[:-2])
        if lead_w == lead_p:
            return self._weighted_sum(weights, p)
        group = _gqa_group(lead_w, lead_p, "weights")
        tq = weights.shape[-2]
        out = self._weighted_sum(weights.reshape(*lead_p, group * tq, p.num_tokens), p)
        return out.reshape(*lead_w, tq, p.head_dim)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ValueError if this method cannot store vectors of ``head_dim`` (default: any)."""

    def shared_nbytes(self, head_dim: int) -> int:
        """Bytes of layer/model-wide objects (rotations, fixed codebooks) for this head dim."""
        return 0

    # ----- for subclasses ---------------------------------------------------------------------
    @abc.abstractmethod
    def _quantize(self, x: torch.Tensor, **context: Any) -> QuantizedTensor: ...

    @abc.abstractmethod
    def _dequantize(self, p: QuantizedTensor) -> torch.Tensor: ...

    def _dequantize_into(self, p: QuantizedTensor, out: torch.Tensor) -> None:
        """The kernel on CUDA (``dequantize_kernel``), else dequantize and copy."""
        if not (self.dequantize_kernel and cuda_dequantize_into(p, out)):
            out.copy_(self._dequantize(p))

    def _scores(self, q: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        """Generic fallback: dequantize, then one matmul in float32."""
        keys = self._dequantize(p).float()
        return q.float() @ keys.transpose(-1, -2)

    def _weighted_sum(self, weights: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        """Generic fallback: dequantize, then one matmul in float32."""
        return weights.float() @ self._dequantize(p).float()

    def _check_stored(self, p: Any) -> None:
        if not isinstance(p, self.stored_type):
            raise TypeError(
                f"quantizer {self.name!r} expects a {self.stored_type.__name__}; "
                f"got {type(p).__name__}"
            )
        self._check_stored_params(p)

    def _check_stored_params(self, p: Any) -> None:
        """ValueError when ``p`` was quantized with other parameters (see ``stored_params``)."""
        mine = {f: getattr(self.config, f) for f in self.stored_params}
        theirs = {f: getattr(p, attr) for f, attr in self.stored_params.items()}
        if mine != theirs:
            def show(d: dict[str, Any]) -> str:
                return ", ".join(f"{k}={v!r}" for k, v in d.items())

            raise ValueError(f"tensor was quantized with {show(theirs)}; this quantizer has {show(mine)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"kvpolar.quantizer({self.name!r}, {params})"


def _gqa_group(lead_x: tuple[int, ...], lead_p: tuple[int, ...], name: str) -> int:
    """Query heads per KV head when ``lead_x`` is ``lead_p`` with a multiple on the head axis."""
    if len(lead_x) == len(lead_p) >= 1 and lead_x[:-1] == lead_p[:-1] and lead_x[-1] % lead_p[-1] == 0:
        return lead_x[-1] // lead_p[-1]
    raise ValueError(
        f"{name} leading shape {lead_x} does not match the quantized tensor's {lead_p}: expected "
        "the same, or the same with the head axis a multiple of it (GQA)"
    )
