"""``QuantizedTensor``: the stored form of a quantized ``[..., T, D]`` tensor.

Each method defines a frozen dataclass subclass whose fields are either

* stored tensors (``stored(token_axis=...)``): packed codes, scales, minimums, norms, codebooks.
  They count towards ``nbytes`` and ``bits_per_element``. ``token_axis`` (negative, counted from
  the end) is the axis that grows with the token count; ``None`` marks a per-tensor object (e.g. an
  online codebook) that concatenation requires to be identical across parts. A ``[..., T, G]``
  field declared ``tokens_contiguous`` keeps its shape but is laid out ``[..., G, T]`` in memory
  (``tokens_contiguous(t)``; ``cat`` keeps that layout), so that a kernel reads one group's values
  of consecutive tokens as one vector; one declared ``tokens_contiguous=KEPT`` may be stored either
  way, and ``cat`` / ``select_batch`` keep the layout of the (first) tensor they are given;
* shared tensors (``shared()``): objects owned by a layer or model (e.g. a rotation matrix). They are
  referenced, reported by ``shared_nbytes`` and never counted per tensor;
* plain static parameters (bits, group size, ...), which must match for concatenation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import torch

_T = TypeVar("_T", bound="QuantizedTensor")

_ROLE = "kvpolar_role"
_TOKEN_AXIS = "kvpolar_token_axis"
_TOKENS_CONTIGUOUS = "kvpolar_tokens_contiguous"
#: ``stored(tokens_contiguous=KEPT)``: the quantizer chooses the layout, concatenation keeps it
KEPT = "kept"


def quantized_tensor_class(cls: type[_T]) -> type[_T]:
    """Decorator for a method's stored form: a frozen dataclass keeping the base ``__repr__``."""
    return dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)


def stored(token_axis: int | None = -2, tokens_contiguous: bool | str = False) -> Any:
    """Declare a stored tensor field; ``token_axis`` is the (negative) axis that grows with T.
    ``tokens_contiguous``: True, a ``[..., T, G]`` field always stored ``[..., G, T]`` in memory (see
    :func:`tokens_contiguous`); :data:`KEPT`, stored as the quantizer lays it out, either way, and
    kept so by ``cat`` and ``select_batch`` (:func:`laid_out_tokens_contiguous` of the first part);
    both need ``token_axis=-2``."""
    if token_axis is not None and token_axis >= 0:
        raise ValueError(f"token_axis={token_axis} must be negative (counted from the end) or None")
    if tokens_contiguous not in (False, True, KEPT):
        raise ValueError(f"tokens_contiguous={tokens_contiguous!r}; expected False, True or {KEPT!r}")
    if tokens_contiguous and token_axis != -2:
        raise ValueError(f"tokens_contiguous needs token_axis=-2 (a [..., T, G] field); got token_axis={token_axis}")
    return dataclasses.field(metadata={_ROLE: "stored", _TOKEN_AXIS: token_axis, _TOKENS_CONTIGUOUS: tokens_contiguous})


def tokens_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[..., T, G]`` with the same shape and values, laid out ``[..., G, T]`` in memory
    (stride 1 along the tokens; a copy unless it already is)."""
    if t.dim() < 2:
        raise ValueError(f"tokens_contiguous needs a [..., T, G] tensor; got shape {tuple(t.shape)}")
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def laid_out_tokens_contiguous(t: torch.Tensor) -> bool:
    """Whether ``t`` ``[..., T, G]`` (more than one token and one column) has consecutive tokens
    adjacent in memory, as :func:`tokens_contiguous` lays it out."""
    return t.dim() >= 2 and t.shape[-2] > 1 and t.shape[-1] > 1 and t.stride(-2) == 1


def _keeps_tokens_contiguous(field: dataclasses.Field, first: torch.Tensor) -> bool:
    """Whether a concatenation or selection of ``field`` lays its result out tokens-contiguous
    (``first``: the tensor of its first part)."""
    how = field.metadata.get(_TOKENS_CONTIGUOUS)
    return how is True or (how == KEPT and laid_out_tokens_contiguous(first))


def shared() -> Any:
    """Declare a tensor shared by a layer/model: referenced, reported separately, not counted."""
    return dataclasses.field(metadata={_ROLE: "shared"})


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Base class of every method's stored form.

    Attributes:
        shape: shape of the original tensor, ``[..., T, D]``.
        dtype: dtype of the original tensor (and of dequantized output).
    """

    shape: torch.Size
    dtype: torch.dtype

    #: Tokens covered by one row of token-grouped metadata (e.g. KIVI keys: the group size).
    #: Concatenation needs every part but the last to hold a whole number of such groups.
    token_group: ClassVar[int] = 1

    # ----- fields by role -------------------------------------------------------------------
    @classmethod
    def _fields_with_role(cls, role: str) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get(_ROLE) == role]

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this object holds and is accountable for, by name."""
        return {f.name: getattr(self, f.name) for f in self._fields_with_role("stored")}

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """Layer/model-wide objects this object refers to (not counted in ``nbytes``)."""
        return {f.name: getattr(self, f.name) for f in self._fields_with_role("shared")}

    def _static_params(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if _ROLE not in f.metadata and f.name not in ("shape", "dtype")
        }

    # ----- sizes ------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.shape[-2])

    @property
    def head_dim(self) -> int:
        return int(self.shape[-1])

    @property
    def numel(self) -> int:
        """Elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually held: every stored tensor (codes, scales, zero points, norms, codebooks)."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    @property
    def shared_nbytes(self) -> int:
        """Bytes of layer/model-wide objects referenced (reported separately)."""
        return sum(t.numel() * t.element_size() for t in self.shared_tensors().values())

    @property
    def bits_per_element(self) -> float:
        """Every stored bit divided by the number of elements of the original tensor."""
        if self.numel == 0:
            return 0.0
        return self.nbytes * 8 / self.numel

    @property
    def device(self) -> torch.device:
        return next(iter(self.stored_tensors().values())).device

    # ----- movement and growth ----------------------------------------------------------------
    def to(self: _T, device: torch.device | str) -> _T:
        """A copy with every tensor (stored and shared) on ``device``."""
        moved = {name: t.to(device) for name, t in self._tensor_items()}
        return dataclasses.replace(self, **moved)

    def _tensor_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.stored_tensors().items()
        yield from self.shared_tensors().items()

    def cat(self: _T, *others: _T) -> _T:
        """Concatenate along the token axis (``self`` first). See :func:`cat`."""
        return cat([self, *others])

    def select_batch(self: _T, index: torch.Tensor) -> _T:
        """A copy holding rows ``index`` (int64 ``[N]``, repeats allowed) of the leading axis: the
        batch of a cache's ``[B, H, T, D]`` tensors (beam search reorders it, generation modes that
        expand or drop sequences repeat or select rows). Stored tensors that carry the axis before
        their token axis are indexed (tokens-contiguous fields keep their layout); tensors without
        it (per-chunk token counts, an analytic codebook's placeholder) and broadcast ones (size 1:
        one scale for the whole tensor) are kept, shared tensors referenced.

        Raises:
            ValueError: the tensor has no leading axis, or ``index`` is not a 1-D integer tensor (rows
                out of range fail in ``index_select``; they are not checked here, which would read
                the index on the host every decode step).
        """
        if len(self.shape) <= 2:
            raise ValueError(f"select_batch needs leading dims before [T, D]; this tensor has shape {tuple(self.shape)}")
        if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"index: expected a 1-D integer tensor of rows, got {index.dtype} of shape {tuple(index.shape)}"
            )
        rows = int(self.shape[0])
        picked: dict[str, torch.Tensor] = {}
        for f in self._fields_with_role("stored"):
            t = getattr(self, f.name)
            axis = f.metadata[_TOKEN_AXIS]
            leading = t.dim() + axis if axis is not None else t.dim() - 1  # axes before the token (or entry) axis
            if leading < 1 or t.shape[0] == 1 and rows != 1:
                continue
            if t.shape[0] != rows:
                raise ValueError(f"'{f.name}' has {t.shape[0]} rows on its leading axis; the tensor has {rows}")
            keep = _keeps_tokens_contiguous(f, t)
            t = t.index_select(0, index.to(t.device))
            picked[f.name] = tokens_contiguous(t) if keep else t
        return dataclasses.replace(self, shape=torch.Size((index.numel(), *self.shape[1:])), **picked)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._static_params().items())
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, {params}, "
            f"bits_per_element={self.bits_per_element:.4g}, nbytes={self.nbytes})"
        )


def cat(parts: Sequence[_T]) -> _T:
    """Concatenate quantized tensors of one method along the token axis (caches grow).

    All parts must share the method, static parameters, leading shape, head dim, dtype and any
    per-tensor objects (e.g. an online codebook). A part whose token count leaves a partial
    metadata group may only come last.

    Raises:
        ValueError: parts are incompatible, or a partial group would end up mid-tensor.
    """
    if not parts:
        raise ValueError("cat needs at least one QuantizedTensor; got an empty sequence")
    first = parts[0]
    cls = type(first)
    for i, part in enumerate(parts[1:], start=1):
        _check_compatible(first, part, i)
    group = first.token_group
    for i, part in enumerate(parts[:-1]):
        if part.num_tokens % group:
            raise ValueError(
                f"cannot append after part {i}: its {part.num_tokens} tokens end in a partial group "
                f"of a {cls.__name__} with {group} tokens per group; only the last part may hold a "
                "partial group (quantize caches in whole groups)"
            )
    if len(parts) == 1:
        return first
    merged: dict[str, torch.Tensor] = {}
    for f in cls._fields_with_role("stored"):
        axis = f.metadata[_TOKEN_AXIS]
        tensors = [getattr(p, f.name) for p in parts]
        if axis is None:
            for i, t in enumerate(tensors[1:], start=1):
                if not torch.equal(t, tensors[0]):
                    raise ValueError(
                        f"cannot concatenate: part {i} has a different per-tensor '{f.name}' "
                        f"(e.g. an online codebook); re-quantize the parts together instead"
                    )
            merged[f.name] = tensors[0]
        elif _keeps_tokens_contiguous(f, tensors[0]):  # joined as [..., G, T]: the result keeps the layout
            merged[f.name] = torch.cat([t.transpose(-1, -2) for t in tensors], dim=-1).transpose(-1, -2)
        else:
            merged[f.name] = torch.cat(tensors, dim=axis)
    total_tokens = sum(p.num_tokens for p in parts)
    shape = torch.Size((*first.shape[:-2], total_tokens, first.shape[-1]))
    return dataclasses.replace(first, shape=shape, **merged)


def _check_compatible(first: QuantizedTensor, part: QuantizedTensor, index: int) -> None:
    if type(part) is not type(first):
        raise ValueError(
            f"cannot concatenate {type(first).__name__} with {type(part).__name__} (part {index})"
        )
    if part.dtype != first.dtype:
        raise ValueError(f"cannot concatenate dtype {first.dtype} with {part.dtype} (part {index})")
    if part.shape[:-2] != first.shape[:-2] or part.shape[-1] != first.shape[-1]:
        raise ValueError(
            f"cannot concatenate shapes {tuple(first.shape)} and {tuple(part.shape)} (part {index}): "
            "leading dims and head dim must match"
        )
    if part._static_params() != first._static_params():
        raise ValueError(
            f"cannot concatenate parts quantized with different parameters: "
            f"{first._static_params()} vs {part._static_params()} (part {index})"
        )
    for name, tensor in first.shared_tensors().items():
        other = getattr(part, name)
        if other is not tensor and not torch.equal(other, tensor):
            raise ValueError(f"cannot concatenate parts with different shared '{name}' (part {index})")
