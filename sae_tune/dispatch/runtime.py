"""From an option to code that is safe to run for one call: overflow gating, building, verification.

Overflow safety: a ``validate`` variant (host sync, raises past max_l0) runs as ``fallback`` with the same
max_l0, so a token above the tuned cap decodes exactly instead of raising; an ``unchecked`` variant or the
``embedding_bag_topk`` path (both keep a fixed number of features per token) runs only when the caller
promised that no token has more than the cap (``k``, e.g. a TopK SAE's k) or allowed truncation. A
promise can be broken unseen (an edit through ``.data`` bypasses autograd), so it never licenses
truncation: under ``k`` the unchecked variant runs as ``fallback`` (same slots, exact above the cap, no
sync) and the topk path re-decodes a token above k exactly. Only ``allow_truncation`` truncates.

Verification: the first time an option runs for a (device, dtype, F, D) it is compared with the exact
product in float64 over the fired rows (``autotune.verify``); an option that raises or differs is never
used again in the process. A batch whose result overflows the output dtype cannot decide (the dense
product's own value depends on summation order there): the option stays unverified for the next call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sae_tune.autotune.verify import Reference, check
from sae_tune.dispatch.decision import Option
from sae_tune.dispatch.grad import DecodeFn
from sae_tune.inputs import KERNEL_DTYPES, DecodeInputs, check_decode_inputs
from sae_tune.torch_paths import TORCH_PATHS
from sae_tune.triton_support import triton_unavailable_reason
from sae_tune.variants import Variant

__all__ = ["KERNEL_DTYPES", "CallContext", "Verification", "build", "gate", "verify"]

VERIFY_TOKENS = 64


@dataclass(frozen=True)
class CallContext:
    """What a call allows: its device and dtype, and the caller's promise about per-token L0."""

    device: torch.device
    dtype: torch.dtype
    k: int | None = None
    allow_truncation: bool = False

    def bounded_by(self, cap: int) -> bool:
        """True when no token of this call can have more than ``cap`` non-zeros (or truncation is allowed)."""
        return self.allow_truncation or (self.k is not None and self.k <= cap)


def gate(option: Option, ctx: CallContext) -> tuple[Option | None, str]:
    """The option as it may run in ``ctx`` (possibly with a safer overflow policy), or None and why not."""
    config = option.config
    if option.impl == "triton":
        reason = triton_unavailable_reason(ctx.device)
        if reason is not None:
            return None, reason
        if ctx.dtype not in KERNEL_DTYPES:
            return None, f"the generated kernels do not take {ctx.dtype}"
        try:
            variant = Variant.from_dict(config)
        except (TypeError, ValueError) as exc:
            return None, f"not a valid variant: {exc}"
        policy = variant.overflow
        if variant.alloc == "fixed" and (
            policy == "validate" or (policy == "unchecked" and not ctx.allow_truncation)
        ):
            safe = dataclasses.replace(variant, overflow="fallback")
            note = (
                f"; runs with overflow=fallback (tuned as {policy}) so tokens above max_l0={variant.max_l0} "
                "stay exact"
            )
            return Option.of(
                "triton", safe.to_dict(), option.source, option.reason + note, l0_bucket=option.l0_bucket
            ), ""
        return option, ""
    path = TORCH_PATHS.get(option.impl)
    if path is None:
        return None, f"unknown implementation {option.impl!r}"
    if path.can_truncate:
        cap = config.get("k")
        if type(cap) is not int or not ctx.bounded_by(cap):
            return None, (
                f"{option.impl} keeps only k={cap} features per token and the caller did not promise "
                "that no token has more"
            )
    if not path.supports(ctx.dtype, ctx.device):
        return None, f"{option.impl} does not run {ctx.dtype} on {ctx.device.type}"
    return option, ""


def build(option: Option) -> DecodeFn:
    """The decode function of an option that passed ``gate``."""
    config = option.config
    if option.impl == "triton":
        from sae_tune.kernels import run_variant

        variant = Variant.from_dict(config)

        def run(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
            inputs = check_decode_inputs(acts, W_dec, b_dec)
            out = run_variant(inputs, variant, allow_truncation=variant.can_truncate)  # gated above
            return out.reshape(*inputs.lead_shape, inputs.D)

        return run
    if option.impl == "dense":
        return TORCH_PATHS["dense"].build()
    return TORCH_PATHS[option.impl].build(**config)


@dataclass(frozen=True)
class Verification:
    """Outcome of a first-use check. ``problem`` is "" when the option is correct; ``decided`` is False
    when this batch could not tell (its result overflows the output dtype): try again on the next."""

    out: torch.Tensor | None
    problem: str
    decided: bool = True

    @property
    def ok(self) -> bool:
        return self.decided and not self.problem


def verify(fn: DecodeFn, inputs: DecodeInputs) -> Verification:
    """Run ``fn`` once and compare with the exact product.

    At most ``VERIFY_TOKENS`` tokens are checked (the float64 reference copies every W_dec row they fire);
    the output is returned for reuse only when that was the whole batch. A bias of a wider dtype than
    W_dec (bf16 weights, fp32 bias) is left out: the product is rounded to W_dec's dtype before the
    promotion, so only the product can be held to W_dec's tolerance (the bias add is torch's own op).
    """
    with torch.no_grad():
        acts, W = inputs.acts[:VERIFY_TOKENS].detach(), inputs.W_dec.detach()
        b = None if inputs.b_dec is None else inputs.b_dec.detach()
        promotes = b is not None and b.dtype != W.dtype
        if promotes:
            b = None
        try:
            out = fn(acts, W, b)
        except Exception as exc:  # a compile error, a kernel the templates cannot render, ...
            return Verification(None, f"raised {type(exc).__name__}: {str(exc)[:300]}")
        fired = (acts != 0).any(0).nonzero().flatten()
        expected = W.dtype if promotes else inputs.out_dtype
        verdict = check(out, Reference.of(acts[:, fired], W[fired], b), expected)
    if not verdict.decided:
        return Verification(None, verdict.reason, decided=False)
    if not verdict.ok:
        return Verification(None, f"wrong result against dense: {verdict.reason}")
    whole = not promotes and inputs.n_tokens <= VERIFY_TOKENS
    return Verification(out if whole else None, "")
