"""SAELens: the decoder matmul of JumpReLU, TopK, standard (ReLU) and gated SAEs goes through the dispatcher.

Studied in sae-lens 6.x (``sae_lens/saes/*.py``): ``decode`` computes ``feature_acts @ self.W_dec +
self.b_dec`` inline (TopK through ``act_times_W_dec``, the same matmul), then ``hook_sae_recons``,
``run_time_activation_norm_fn_out`` and ``reshape_fn_out``. There is no narrower function to replace, so
each class's ``decode`` is wrapped to run unchanged inside ``RouteDecoderMatmul``, which swaps only that
one matmul; the bias add, hooks, normalisation and reshaping run as SAELens wrote them.

Sparse end to end (``saelens_sparse``): the ``forward`` of StandardSAE, JumpReLUSAE and TopKSAE (inherited
from ``SAE``) is wrapped too; without activation hooks or autograd it encodes into ``SparseActs`` and
decodes from them, never building the dense (tokens x features) activations; otherwise it is unchanged.

TopK: the dispatcher may run paths that keep at most k features per token only if nothing can give a
token more. The output of SAELens's ``TopK`` activation is marked as holding at most k per row; the mark
holds while that very tensor reaches ``decode`` unmodified (a hook that replaces it or edits it in place
voids it, through the tensor's version counter). Acts from anywhere else carry no promise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from sae_tune.integrations import saelens_sparse
from sae_tune.integrations.route import RouteDecoderMatmul, promise_row_bound
from sae_tune.integrations.saelens_names import DECODE_CLASSES, MODULES, TOPK_ACTIVATION  # noqa: F401

ORIGINAL = saelens_sparse.ORIGINAL
# set on a wrapper of an attribute the class inherited: unpatching deletes it instead of restoring it
INHERITED = "__sae_tune_inherited__"


def _routed_decode(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    from sae_tune.decode import sparse_decode

    @functools.wraps(original)
    def decode(self: Any, feature_acts: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        W_dec = getattr(self, "W_dec", None)
        if not isinstance(W_dec, torch.Tensor) or torch.compiler.is_compiling():
            return original(self, feature_acts, *args, **kwargs)
        with RouteDecoderMatmul(W_dec, sparse_decode):
            return original(self, feature_acts, *args, **kwargs)

    setattr(decode, ORIGINAL, original)
    return decode


def _bounded_topk(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(original)
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        out = original(self, x)
        k = getattr(self, "k", None)
        if isinstance(out, torch.Tensor) and out.layout == torch.strided and type(k) is int and k > 0:
            promise_row_bound(out, k)
        return out

    setattr(forward, ORIGINAL, original)
    return forward


def _targets(
    module: ModuleType,
) -> list[tuple[type, str, Callable[[Callable[..., Any]], Callable[..., Any]]]]:
    out = []
    for name in DECODE_CLASSES.get(module.__name__, ()):
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            out.append((cls, "decode", _routed_decode))
    for name, kind in saelens_sparse.FORWARD_CLASSES.get(module.__name__, ()):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and "encode" in cls.__dict__ and "decode" in cls.__dict__:
            saelens_sparse.study(cls, kind)
            out.append((cls, "forward", saelens_sparse.sparse_forward))
    if module.__name__ == TOPK_ACTIVATION[0]:
        cls = getattr(module, TOPK_ACTIVATION[1], None)
        if isinstance(cls, type):
            out.append((cls, "forward", _bounded_topk))
    return out


def patch_module(module: ModuleType) -> list[str]:
    """Wrap the targets defined in ``module`` (idempotent); returns the names wrapped now."""
    done = []
    for cls, attr, wrap in _targets(module):
        own = cls.__dict__.get(attr)
        if own is not None and hasattr(own, ORIGINAL):
            continue
        current = own if own is not None else getattr(cls, attr, None)  # forward is inherited from SAE
        if current is None:
            continue
        wrapped = wrap(current)
        if own is None:
            setattr(wrapped, INHERITED, True)
        setattr(cls, attr, wrapped)
        done.append(f"{cls.__qualname__}.{attr}")
    return done


def unpatch_module(module: ModuleType) -> list[str]:
    """Put back what ``patch_module`` wrapped; returns the names restored."""
    done = []
    for cls, attr, _ in _targets(module):
        current = cls.__dict__.get(attr)
        original = getattr(current, ORIGINAL, None)
        if original is not None:
            if getattr(current, INHERITED, False):
                delattr(cls, attr)
            else:
                setattr(cls, attr, original)
            done.append(f"{cls.__qualname__}.{attr}")
    return done


def is_patched(cls: type) -> bool:
    """Whether ``cls.decode`` (as found through its class hierarchy) is routed by sae-tune."""
    return hasattr(getattr(cls, "decode", None), ORIGINAL)
