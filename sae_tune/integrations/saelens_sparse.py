"""SAELens, sparse end to end: a forward that encodes straight into ``SparseActs`` and decodes from them.

Studied in sae-lens 6.x (``sae_lens/saes/sae.py``, ``standard_sae.py``, ``jumprelu_sae.py``,
``topk_sae.py``). ``SAE.forward`` is ``decode(encode(x))``, then the error term (``use_error_term``:
the same, recomputed under ``no_grad`` with every hook disabled) and ``hook_sae_output``. ``encode`` is
``process_sae_in`` (dtype cast, hook_z flattening, ``hook_sae_input``, input normalisation, minus
``b_dec``), the pre-activation GEMM, ``hook_sae_acts_pre``, the activation and ``hook_sae_acts_post``;
``decode`` is ``acts @ W_dec + b_dec``, ``hook_sae_recons``, output normalisation and hook_z reshaping.

The patched forward keeps every one of those steps as SAELens's own code except the two that need the
dense (tokens x features) tensor: the activation hooks, and the activation itself, which
``sparse_encode`` computes with exactly SAELens's non-zeros. It does so only when nothing could tell the
difference (``dense_reason`` is None): an SAE whose ``encode`` and ``decode`` are the studied ones and
whose activation module is the plain one (ReLU, or ``TopK`` with dense output and no decoder-norm
rescaling), no hook on ``hook_sae_acts_pre`` / ``hook_sae_acts_post`` / the activation module nor any
global module hook, autograd not recording, no autocast, no tracing or compiling. Otherwise it is
SAELens's forward (with the decoder matmul routed as before).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from sae_tune.decode import decode_sparse_acts
from sae_tune.encode import sparse_encode
from sae_tune.sparse_acts import SparseActs

ORIGINAL = "__sae_tune_original__"
# module -> (class, activation kind) whose forward becomes sparse end to end
FORWARD_CLASSES = {
    "sae_lens.saes.standard_sae": (("StandardSAE", "relu"),),
    "sae_lens.saes.jumprelu_sae": (("JumpReLUSAE", "jumprelu"),),
    "sae_lens.saes.topk_sae": (("TopKSAE", "topk"),),
}
# class -> (kind, the encode studied, the decode studied (unwrapped)); filled when a module is patched
_STUDIED: dict[type, tuple[str, Callable[..., Any], Callable[..., Any]]] = {}
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _unwrapped(fn: Any) -> Any:
    return getattr(fn, ORIGINAL, fn)


def study(cls: type, kind: str) -> None:
    """Record the ``encode`` and ``decode`` of ``cls`` that the sparse forward reproduces."""
    _STUDIED[cls] = (kind, cls.__dict__["encode"], _unwrapped(cls.__dict__["decode"]))


def _studied(sae: Any) -> tuple[str, Callable[..., Any], Callable[..., Any]] | None:
    for cls in type(sae).__mro__:
        if cls in _STUDIED:
            return _STUDIED[cls]
    return None


def _hooked(module: Any) -> bool:
    """Whether torch would call anything besides ``module.forward`` when ``module`` is called."""
    return any(
        getattr(module, name, None)
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _plain_hook_point(point: Any) -> bool:
    try:
        from transformer_lens.hook_points import HookPoint
    except ImportError:  # pragma: no cover - SAELens depends on transformer_lens
        return False
    return isinstance(point, HookPoint) and type(point).forward is HookPoint.forward and not _hooked(point)


def _activation(sae: Any, kind: str) -> dict[str, Any] | str:
    """``sparse_encode``'s activation arguments for ``sae``, or why its activation is not the studied one."""
    fn = getattr(sae, "activation_fn", None)
    if isinstance(fn, nn.Module) and _hooked(fn):
        return "a hook is attached to the activation module"
    if kind in ("relu", "jumprelu"):
        if type(fn) is not nn.ReLU:
            return f"the activation is {type(fn).__name__}, not ReLU"
        if kind == "relu":
            return {}
        thr = getattr(sae, "threshold", None)
        if not isinstance(thr, torch.Tensor) or thr.shape != sae.W_enc.shape[1:]:
            return "the threshold is not a tensor of one value per feature"
        return {"threshold": thr}
    from sae_lens.saes.topk_sae import TopK

    if type(fn) is not TopK:
        return f"the activation is {type(fn).__name__}, not TopK"
    if getattr(fn, "use_sparse_activations", False):
        return "the TopK activation produces torch.sparse tensors"
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return "rescale_acts_by_decoder_norm is set"
    k = getattr(fn, "k", None)
    if type(k) is not int or not 1 <= k <= sae.W_enc.shape[1]:
        return f"the TopK activation's k ({k!r}) is not an int in [1, F]"
    return {"k": k}


def _weights(sae: Any, kind: str) -> list[torch.Tensor]:
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if kind == "jumprelu" else [])
    return [getattr(sae, n, None) for n in names]


def dense_reason(sae: Any, x: Any, *, forward: bool = True) -> str | None:
    """None when the sparse path gives exactly what SAELens's own code gives; else why not (a sentence).

    ``forward=False`` asks for ``sparse_features`` (which runs under ``no_grad``): autograd is no reason.
    """
    studied = _studied(sae)
    if studied is None:
        return f"{type(sae).__name__} is not a studied SAELens class (standard, JumpReLU, TopK)"
    kind, encode, decode = studied
    if type(sae).encode is not encode or _unwrapped(type(sae).decode) is not decode:
        return f"{type(sae).__name__} overrides encode or decode"
    if any(name in vars(sae) for name in ("encode", "decode", "forward")):
        return "encode, decode or forward is replaced on the instance"
    if type(x) not in (torch.Tensor, nn.Parameter) or x.layout is not torch.strided:
        return "the input is not a plain dense tensor"
    if not (
        _plain_hook_point(getattr(sae, "hook_sae_acts_pre", None))
        and _plain_hook_point(getattr(sae, "hook_sae_acts_post", None))
    ):
        return "a hook is attached to hook_sae_acts_pre or hook_sae_acts_post"
    if any(getattr(nn_module, name, None) for name in _GLOBAL_HOOKS):
        return "a global module hook is registered"
    activation = _activation(sae, kind)
    if isinstance(activation, str):
        return activation
    weights = _weights(sae, kind)
    if any(not isinstance(w, torch.Tensor) or w.layout is not torch.strided for w in weights):
        return "a weight is not a dense tensor"
    if len({w.dtype for w in weights} | {sae.dtype}) != 1:
        return "the weights do not all have the SAE's dtype"
    if len({w.device for w in weights} | {x.device}) != 1:
        return "the input and the weights are not on one device"
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return "torch.compile or tracing is running"
    try:
        if torch.is_autocast_enabled(x.device.type):
            return "autocast is on"
    except (RuntimeError, TypeError):
        return "autocast state unknown for this device"
    if forward and torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return "autograd is recording (run under torch.no_grad() or torch.inference_mode())"
    return None


def _dense_acts(sae: Any, kind: str, sae_in: torch.Tensor) -> torch.Tensor:
    """SAELens's encode after ``process_sae_in``, as written there (for a hook_sae_input that needs grads)."""
    hidden_pre = sae.hook_sae_acts_pre(sae_in @ sae.W_enc + sae.b_enc)
    acts = sae.activation_fn(hidden_pre)
    if kind == "jumprelu":
        acts = acts * (hidden_pre > sae.threshold).to(acts.dtype)
    return sae.hook_sae_acts_post(acts)


def encode_processed(sae: Any, kind: str, sae_in: torch.Tensor, activation: dict[str, Any]) -> SparseActs:
    return sparse_encode(sae_in, sae.W_enc, sae.b_enc, **activation)


def _decode_tail(sae: Any, acts: SparseActs) -> torch.Tensor:
    """SAELens's decode from ``acts @ W_dec`` on: + b_dec, hook_sae_recons, normalisation, reshaping."""
    out = decode_sparse_acts(acts, sae.W_dec) + sae.b_dec
    out = sae.hook_sae_recons(out)
    out = sae.run_time_activation_norm_fn_out(out)
    return sae.reshape_fn_out(out, sae.d_head)


def _reconstruct(sae: Any, kind: str, x: torch.Tensor) -> torch.Tensor:
    """``decode(encode(x))`` without a dense (tokens x features) tensor."""
    activation = _activation(sae, kind)
    assert isinstance(activation, dict)
    sae_in = sae.process_sae_in(x)
    if torch.is_grad_enabled() and sae_in.requires_grad:  # a hook_sae_input hook made it differentiable
        return sae.decode(_dense_acts(sae, kind, sae_in))
    return _decode_tail(sae, encode_processed(sae, kind, sae_in, activation))


def _hooks_disabled(sae: Any) -> contextlib.AbstractContextManager[Any] | None:
    try:
        from sae_lens.saes.sae import _disable_hooks
    except ImportError:
        return None
    return _disable_hooks(sae)


def sparse_forward(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap ``SAE.forward``: sparse end to end when ``dense_reason`` is None, else ``original``."""

    @functools.wraps(original)
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        if dense_reason(self, x) is not None:
            return original(self, x)
        kind = _studied(self)[0]  # type: ignore[index]
        disabled = _hooks_disabled(self) if self.use_error_term else None
        if self.use_error_term and disabled is None:
            return original(self, x)
        sae_out = _reconstruct(self, kind, x)
        if disabled is not None:
            with torch.no_grad():
                with disabled:
                    clean = _reconstruct(self, kind, x)
                sae_error = self.hook_sae_error(x - clean)
            sae_out = sae_out + sae_error
        return self.hook_sae_output(sae_out)

    setattr(forward, ORIGINAL, original)
    return forward


def sparse_features(sae: Any, batches: Iterable[torch.Tensor]) -> Iterator[SparseActs]:
    """Yield the feature activations of a SAELens SAE for each batch of inputs, as ``SparseActs``.

    For caching features over many tokens: a standard, JumpReLU or TopK SAE without hooks on its
    activations encodes straight into sparse form (``sparse_encode``, exactly SAELens's non-zeros);
    any other SAE (or one with such hooks) runs its own ``encode`` and is compacted after. Runs under
    ``torch.no_grad()``.
    """
    if not callable(getattr(sae, "encode", None)) or not isinstance(sae, nn.Module):
        raise TypeError(f"sparse_features takes a SAELens SAE, got {type(sae).__name__}")
    if isinstance(batches, torch.Tensor):
        raise TypeError("sparse_features takes an iterable of input batches; for one tensor x pass [x]")
    for x in batches:
        with torch.no_grad():
            if dense_reason(sae, x, forward=False) is None:
                kind = _studied(sae)[0]  # type: ignore[index]
                activation = _activation(sae, kind)
                assert isinstance(activation, dict)
                acts = encode_processed(sae, kind, sae.process_sae_in(x), activation)
            else:
                acts = SparseActs.from_dense(sae.encode(x))
        yield acts


__all__ = ["dense_reason", "sparse_features", "sparse_forward", "study"]
