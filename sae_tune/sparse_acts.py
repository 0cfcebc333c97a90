"""``SparseActs``: SAE feature activations in CSR form, so that nothing needs a dense (tokens x features)
tensor between the encoder and the decoder.

Row t (token t of the flattened leading shape) holds ``values[offsets[t]:offsets[t+1]]`` at features
``indices[offsets[t]:offsets[t+1]]``. ``sparse_encode`` writes each row's features in ascending order
without repeats; a hand-built ``SparseActs`` may repeat a feature in a row, which then counts as the sum
(as in torch's uncoalesced COO tensors), for ``to_dense`` and for decoding alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INDEX_DTYPES = (torch.int64, torch.int32)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"SparseActs.{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout is not torch.strided:
        raise TypeError(f"SparseActs.{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dim() != 1:
        raise ValueError(f"SparseActs.{name} must be 1-D, got shape {tuple(t.shape)}")
    return t


@dataclass(frozen=True, eq=False)
class SparseActs:
    """CSR feature activations: ``offsets`` (int64, B+1), ``indices`` (int64 or int32, nnz), ``values``
    (the activation dtype, nnz), ``num_features`` (F) and ``lead_shape`` (the leading dimensions of the
    activations they stand for; their product is B). Validated on construction.

    ``max_per_row`` is set by a TopK encode (its k): no row holds more.
    """

    offsets: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    num_features: int
    lead_shape: tuple[int, ...] | None = None
    max_per_row: int | None = None

    def __post_init__(self) -> None:
        offsets = _tensor("offsets", self.offsets)
        indices = _tensor("indices", self.indices)
        values = _tensor("values", self.values)
        F = self.num_features
        if type(F) is not int or F < 0:
            raise ValueError(f"SparseActs.num_features must be a non-negative int, got {F!r}")
        if offsets.dtype != torch.int64:
            raise TypeError(f"SparseActs.offsets must be int64, got {offsets.dtype}")
        if indices.dtype not in INDEX_DTYPES:
            raise TypeError(f"SparseActs.indices must be int64 or int32, got {indices.dtype}")
        if values.dtype not in VALUE_DTYPES:
            raise TypeError(
                f"SparseActs.values must be float32, float16, bfloat16 or float64, got {values.dtype}"
            )
        devices = {t.device for t in (offsets, indices, values)}
        if len(devices) != 1:
            raise ValueError(
                f"SparseActs tensors must be on one device: offsets on {offsets.device}, indices on "
                f"{indices.device}, values on {values.device}"
            )
        if offsets.numel() < 1:
            raise ValueError("SparseActs.offsets must have B+1 >= 1 entries (offsets[0] == 0)")
        B = offsets.numel() - 1
        lead = (B,) if self.lead_shape is None else self.lead_shape
        if not isinstance(lead, tuple) or any(type(n) is not int or n < 0 for n in lead):
            raise ValueError(f"SparseActs.lead_shape must be a tuple of non-negative ints, got {lead!r}")
        if math.prod(lead) != B:
            raise ValueError(
                f"SparseActs.lead_shape {lead} holds {math.prod(lead)} tokens but offsets has {B}"
            )
        object.__setattr__(self, "lead_shape", lead)
        nnz = indices.numel()
        if values.numel() != nnz:
            raise ValueError(f"SparseActs has {nnz} indices but {values.numel()} values")
        first, last = offsets[0].item(), offsets[-1].item()
        if first != 0 or last != nnz:
            raise ValueError(f"SparseActs.offsets must run from 0 to nnz={nnz}, got {first} .. {last}")
        if B and bool((offsets[1:] < offsets[:-1]).any()):
            t = int((offsets[1:] < offsets[:-1]).nonzero()[0].item())
            raise ValueError(f"SparseActs.offsets must not decrease: offsets[{t + 1}] < offsets[{t}]")
        if nnz:
            lo, hi = int(indices.min().item()), int(indices.max().item())
            if lo < 0 or hi >= F:
                raise ValueError(f"SparseActs.indices must lie in [0, {F}), got values in [{lo}, {hi}]")
        k = self.max_per_row
        if k is not None:
            if type(k) is not int or k < 0:
                raise ValueError(f"SparseActs.max_per_row must be a non-negative int or None, got {k!r}")
            most = int((offsets[1:] - offsets[:-1]).max().item()) if B else 0
            if most > k:
                raise ValueError(f"SparseActs.max_per_row is {k} but a row holds {most}")

    @classmethod
    def _trusted(
        cls,
        offsets: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
        num_features: int,
        lead_shape: tuple[int, ...],
        max_per_row: int | None = None,
    ) -> SparseActs:
        """Built by sae-tune's encoders, valid by construction: skips the checks (and their host syncs)."""
        out = object.__new__(cls)
        for name, value in (
            ("offsets", offsets),
            ("indices", indices),
            ("values", values),
            ("num_features", num_features),
            ("lead_shape", tuple(lead_shape)),
            ("max_per_row", max_per_row),
        ):
            object.__setattr__(out, name, value)
        return out

    @classmethod
    def from_dense(cls, acts: torch.Tensor) -> SparseActs:
        """The non-zeros of ``acts`` (..., F) (NaN counts as non-zero), features ascending in each row."""
        if not isinstance(acts, torch.Tensor) or acts.layout is not torch.strided or acts.dim() < 1:
            raise TypeError("SparseActs.from_dense takes a dense tensor of shape (..., F)")
        if acts.dtype not in VALUE_DTYPES:
            raise TypeError(f"SparseActs.from_dense takes a floating tensor, got {acts.dtype}")
        F = acts.shape[-1]
        lead = tuple(acts.shape[:-1])
        flat = acts.detach().reshape(math.prod(lead), F)
        token, feature = flat.nonzero().unbind(1)
        counts = torch.bincount(token, minlength=flat.shape[0])
        offsets = torch.zeros(flat.shape[0] + 1, dtype=torch.int64, device=acts.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        return cls._trusted(offsets, feature, flat[token, feature], F, lead)

    @property
    def n_tokens(self) -> int:
        return self.offsets.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dense activations this stands for: ``lead_shape + (F,)``."""
        assert self.lead_shape is not None
        return (*self.lead_shape, self.num_features)

    def row_counts(self) -> torch.Tensor:
        """Non-zeros per token (B,), int64: the L0 of each token."""
        return self.offsets[1:] - self.offsets[:-1]

    def rows(self) -> torch.Tensor:
        """The token of each stored value (nnz,), int64 (COO row indices)."""
        return torch.repeat_interleave(
            torch.arange(self.n_tokens, device=self.device), self.row_counts(), output_size=self.nnz
        )

    def to_dense(self) -> torch.Tensor:
        """The dense activations, shape ``lead_shape + (F,)`` in the values' dtype (repeats summed)."""
        out = torch.zeros(self.n_tokens, self.num_features, dtype=self.dtype, device=self.device)
        if self.nnz:
            out.index_put_((self.rows(), self.indices.long()), self.values, accumulate=True)
        return out.reshape(self.shape)

    def __repr__(self) -> str:
        return (
            f"SparseActs(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype}, device={self.device}"
            + (f", max_per_row={self.max_per_row}" if self.max_per_row is not None else "")
            + ")"
        )
