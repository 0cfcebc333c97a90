"""``SparseActs``: SAE feature activations in CSR form, so that nothing needs a dense (tokens x features)
tensor between the encoder and the decoder.

Row t (token t of the flattened leading shape) holds ``values[offsets[t]:offsets[t+1]]`` at features
``indices[offsets[t]:offsets[t+1]]``. ``sparse_encode`` writes each row's features in ascending order
without repeats; a hand-built ``SparseActs`` may repeat a feature in a row, which then counts as the sum
(as in torch's uncoalesced COO tensors), for ``to_dense`` and for decoding alike.

A ``SparseActs`` is data from outside like any other input: the dataclass is frozen, but its tensors are
not, and an edit after construction (in place, through ``.data`` or ``.numpy()``, ``resize_``, ``set_``, a
shrunk storage) bumps no reliable version counter. So every reader checks the CSR again before it reads
through it (see ``SparseActs`` for where and at what cost).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
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
    if t.device.type != "meta" and t.numel():
        # a storage shrunk under the tensor (``t.untyped_storage().resize_(0)``) would be read past its end
        span = (t.storage_offset() + (t.numel() - 1) * t.stride(0) + 1) * t.element_size()
        have = t.untyped_storage().nbytes()
        if t.stride(0) < 0 or t.storage_offset() < 0 or span > have:
            raise ValueError(f"SparseActs.{name} spans {span} bytes of a storage that holds {have}")
    return t


def _host_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a 1-D integer CPU tensor whose storage ``_tensor`` checked. Not ``t.numpy()``: that
    marks the caller's storage as not resizable for good."""
    dtype = np.int64 if t.dtype == torch.int64 else np.int32
    if t.numel() == 0:
        return np.zeros(0, dtype=dtype)
    span = ((t.numel() - 1) * t.stride(0) + 1) * t.element_size()
    raw = np.frombuffer((ctypes.c_char * span).from_address(t.data_ptr()), dtype=np.uint8)
    return np.lib.stride_tricks.as_strided(
        raw.view(dtype),
        shape=(t.numel(),),
        strides=(t.stride(0) * t.element_size(),),
        writeable=False,
    )


def _content_stats(
    offsets: torch.Tensor, indices: torch.Tensor, use_numpy: bool | None = None
) -> tuple[int, int, int | None, int, int, int]:
    """(offsets[0], offsets[-1], the first t with offsets[t+1] < offsets[t] or None, the largest row, the
    smallest and largest index; 0, -1 without indices), with one host sync.

    Plain CPU tensors go through numpy: one single-threaded pass, where torch's reductions above 32k
    elements fork onto every thread and, on a loaded machine, wait whole time slices at the join."""
    if use_numpy is None:
        plain = type(offsets) is torch.Tensor and type(indices) is torch.Tensor
        use_numpy = plain and offsets.device.type == "cpu"
    if use_numpy:
        off, idx = _host_view(offsets), _host_view(indices)
        down = off[1:] < off[:-1]  # compared, not subtracted: a difference of hostile int64s can wrap
        decrease = int(down.argmax()) if down.any() else None
        most = int((off[1:] - off[:-1]).max()) if off.size > 1 else 0
        lo, hi = (int(idx.min()), int(idx.max())) if idx.size else (0, -1)
        return int(off[0]), int(off[-1]), decrease, most, lo, hi
    stats = [offsets[0], offsets[-1]]
    if offsets.numel() > 1:
        stats += [(offsets[1:] < offsets[:-1]).any().long(), offsets.diff().max()]
    if indices.numel():
        stats.extend(x.long() for x in torch.aminmax(indices))
    got = torch.stack(stats).tolist()
    decrease, most, lo, hi = None, 0, 0, -1
    if offsets.numel() > 1:
        most = got[3]
        if got[2]:
            decrease = int((offsets[1:] < offsets[:-1]).nonzero()[0].item())
    if indices.numel():
        lo, hi = got[-2], got[-1]
    return got[0], got[1], decrease, most, lo, hi


@dataclass(frozen=True, eq=False)
class SparseActs:
    """CSR feature activations: ``offsets`` (int64, B+1), ``indices`` (int64 or int32, nnz), ``values``
    (the activation dtype, nnz), ``num_features`` (F) and ``lead_shape`` (the leading dimensions of the
    activations they stand for; their product is B). Validated on construction.

    ``max_per_row`` is set by a TopK encode (its k): no row holds more.

    Every reader (``sparse_decode``, ``to_dense``, ``rows``, ``row_counts``, ``nnz`` ...) checks the CSR
    again, since its tensors can be edited after construction without a trace:

    - the layout (types, dtypes, 1-D, one device, lengths, storage sizes, ``lead_shape``) from metadata
      alone, on every call and device; a mismatch raises ``TypeError`` / ``ValueError`` naming the field;
    - the contents (``offsets[0] == 0``, ``offsets[-1] == nnz``, offsets non-decreasing, indices in
      [0, F), no row above ``max_per_row``): on CPU one O(B + nnz) pass before any read, raising
      ``ValueError`` naming the field (under 1% of a gemma-2b-l20 decode at B=32 and 1024); on
      other devices without a host sync: the kernels read a clamped copy of offsets and indices (so no
      content can make them read out of bounds), a device-side flag turns the whole result into NaN
      when the contents are invalid, and ``torch._assert_async`` raises at the next synchronisation
      (on CUDA as a device-side assert). ``validate()`` checks everything at once, with a host sync.
    """

    #: device types whose readers check the contents on the host (elsewhere: clamped copies, no sync)
    _host_checked: ClassVar[frozenset[str]] = frozenset({"cpu", "meta"})

    offsets: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    num_features: int
    lead_shape: tuple[int, ...] | None = None
    max_per_row: int | None = None

    def __post_init__(self) -> None:
        if self.lead_shape is None:
            offsets = _tensor("offsets", self.offsets)
            object.__setattr__(self, "lead_shape", (max(offsets.numel() - 1, 0),))
        self.validate()

    def _layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three tensors, checked from metadata alone (no host sync, no read of their contents)."""
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
        if not offsets.device == indices.device == values.device:
            raise ValueError(
                f"SparseActs tensors must be on one device: offsets on {offsets.device}, indices on "
                f"{indices.device}, values on {values.device}"
            )
        if offsets.numel() < 1:
            raise ValueError("SparseActs.offsets must have B+1 >= 1 entries (offsets[0] == 0)")
        B = offsets.numel() - 1
        lead = self.lead_shape
        if not isinstance(lead, tuple) or any(type(n) is not int or n < 0 for n in lead):
            raise ValueError(f"SparseActs.lead_shape must be a tuple of non-negative ints, got {lead!r}")
        if math.prod(lead) != B:
            raise ValueError(
                f"SparseActs.lead_shape {lead} holds {math.prod(lead)} tokens but offsets has {B}"
            )
        nnz = indices.numel()
        if values.numel() != nnz:
            raise ValueError(f"SparseActs has {nnz} indices but {values.numel()} values")
        if nnz and not B:
            raise ValueError(f"SparseActs.offsets has no rows (B=0) for nnz={nnz} indices and values")
        if nnz and not F:
            raise ValueError(f"SparseActs.indices must lie in [0, 0) (num_features is 0), got {nnz} of them")
        k = self.max_per_row
        if k is not None and (type(k) is not int or k < 0):
            raise ValueError(f"SparseActs.max_per_row must be a non-negative int or None, got {k!r}")
        return offsets, indices, values

    def validate(self) -> SparseActs:
        """Check layout and contents now (one host sync off CPU); raises ``TypeError`` / ``ValueError``
        naming the field. Returns ``self``. One O(B + nnz) pass: on a 2-core EPYC 0.03 ms at B=1024, L0 72
        in a loop, 0.4 ms between decodes on a loaded machine (``benchmarks/sparse_acts_check.py``)."""
        offsets, indices, _ = self._layout()
        if offsets.device.type == "meta":
            return self  # no contents to read
        nnz, F, k = indices.numel(), self.num_features, self.max_per_row
        first, last, decrease, most, lo, hi = _content_stats(offsets, indices)
        if first != 0 or last != nnz:
            raise ValueError(f"SparseActs.offsets must run from 0 to nnz={nnz}, got {first} .. {last}")
        if decrease is not None:
            raise ValueError(
                f"SparseActs.offsets must not decrease: offsets[{decrease + 1}] < offsets[{decrease}]"
            )
        if lo < 0 or hi >= F:
            raise ValueError(f"SparseActs.indices must lie in [0, {F}), got values in [{lo}, {hi}]")
        if k is not None and most > k:
            raise ValueError(f"SparseActs.max_per_row is {k} but a row holds {most}")
        return self

    def _csr(self, sync: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(offsets, int64 indices, ok) that a kernel may read for any contents of this object.

        ``sync`` (default: on CPU only) validates on the host and returns ``ok=None``. Without it the
        offsets are clamped to [0, nnz] and made non-decreasing from 0 to nnz, the indices clamped to
        [0, F), and ``ok`` is a 0-dim bool tensor on the device, False when the contents were invalid:
        the caller hands its result to ``_poisoned``."""
        offsets, indices, _ = self._layout()
        if sync is None:
            sync = offsets.device.type in self._host_checked
        if sync or offsets.device.type == "meta":
            self.validate()
            return offsets.contiguous(), indices.long().contiguous(), None
        nnz, F, k = indices.numel(), self.num_features, self.max_per_row
        ok = (offsets[0] == 0) & (offsets[-1] == nnz)
        safe = torch.cummax(offsets.clamp(0, nnz), 0).values
        safe[0], safe[-1] = 0, nnz
        if offsets.numel() > 1:
            ok &= (offsets[1:] >= offsets[:-1]).all()
            if k is not None:
                ok &= offsets.diff().max() <= k  # decides only where the offsets are in [0, nnz]
        index = indices.long()
        if nnz:
            lo, hi = torch.aminmax(index)
            ok &= (lo >= 0) & (hi < F)
            index = index.clamp(0, F - 1)
        return safe, index.contiguous(), ok

    @staticmethod
    def _poisoned(out: torch.Tensor, ok: torch.Tensor | None) -> torch.Tensor:
        """``out`` if the CSR was valid; else all NaN (floating ``out``) and an asynchronous assert."""
        if ok is None:
            return out
        torch._assert_async(ok, "SparseActs: invalid offsets or indices (edited after construction?)")
        if out.is_floating_point():
            out = out + torch.where(ok, 0.0, math.nan).to(out.dtype)
        return out

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
        """Built by sae-tune's encoders, valid by construction: skips the checks (and their host syncs).
        Readers still check, since the caller can edit the tensors afterwards."""
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
        return self._layout()[0].numel() - 1

    @property
    def nnz(self) -> int:
        return self._layout()[1].numel()

    @property
    def dtype(self) -> torch.dtype:
        return self._layout()[2].dtype

    @property
    def device(self) -> torch.device:
        return self._layout()[2].device

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dense activations this stands for: ``lead_shape + (F,)``."""
        self._layout()
        assert self.lead_shape is not None
        return (*self.lead_shape, self.num_features)

    def row_counts(self) -> torch.Tensor:
        """Non-zeros per token (B,), int64: the L0 of each token."""
        offsets, _, ok = self._csr()
        return self._poisoned(offsets.diff(), ok)

    def rows(self) -> torch.Tensor:
        """The token of each stored value (nnz,), int64 (COO row indices)."""
        offsets, index, ok = self._csr()
        return self._poisoned(self._rows(offsets, index.numel()), ok)

    @staticmethod
    def _rows(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
        tokens = torch.arange(offsets.numel() - 1, device=offsets.device)
        return torch.repeat_interleave(tokens, offsets.diff(), output_size=nnz)

    def to_dense(self) -> torch.Tensor:
        """The dense activations, shape ``lead_shape + (F,)`` in the values' dtype (repeats summed)."""
        offsets, index, ok = self._csr()
        values = self.values
        B, F = offsets.numel() - 1, self.num_features
        out = torch.zeros(B, F, dtype=values.dtype, device=values.device)
        if index.numel():
            out.index_put_((self._rows(offsets, index.numel()), index), values, accumulate=True)
        assert self.lead_shape is not None
        return self._poisoned(out, ok).reshape(*self.lead_shape, F)

    def __repr__(self) -> str:
        try:
            self._layout()
        except (TypeError, ValueError) as exc:
            return f"SparseActs(<invalid: {exc}>)"
        return (
            f"SparseActs(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype}, device={self.device}"
            + (f", max_per_row={self.max_per_row}" if self.max_per_row is not None else "")
            + ")"
        )
