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

Density: a path whose rounding error grows with the non-zeros per token (``Target.density_sensitive``: a
16-bit accumulation) is verified on the densest tokens of the batch, and trusted only up to the largest
per-token L0 it was verified at; the dispatcher verifies it again on a denser batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_tune.autotune.verify import Reference, check
from sae_tune.dispatch.decision import Option
from sae_tune.inputs import DecodeInputs
from sae_tune.targets import CallFacts, DecodeFn, target_of

__all__ = ["CallFacts", "Verification", "build", "gate", "verify"]

VERIFY_TOKENS = 64


def gate(option: Option, ctx: CallFacts) -> tuple[Option | None, str]:
    """The option as it may run in ``ctx`` (its target may make it safer), or None and why not."""
    try:
        target = target_of(option.impl)
    except ValueError as exc:
        return None, str(exc)
    gated = target.gate(option.impl, option.config, ctx)
    if isinstance(gated, str):
        return None, gated
    if gated.config == option.config and not gated.note:
        return option, ""
    return Option.of(
        gated.impl, gated.config, option.source, option.reason + gated.note, l0_bucket=option.l0_bucket
    ), ""


def build(option: Option) -> DecodeFn:
    """The decode function of an option that passed ``gate``."""
    return target_of(option.impl).build(option.impl, option.config)


@dataclass(frozen=True)
class Verification:
    """Outcome of a first-use check. ``problem`` is "" when the option is correct; ``decided`` is False
    when this batch could not tell (its result overflows the output dtype): try again on the next."""

    out: torch.Tensor | None
    problem: str
    decided: bool = True
    l0: int | None = None  # with ``densest``: the largest per-token L0 among the tokens checked

    @property
    def ok(self) -> bool:
        return self.decided and not self.problem


def verify(fn: DecodeFn, inputs: DecodeInputs, *, densest: bool = False) -> Verification:
    """Run ``fn`` once and compare with the exact product.

    At most ``VERIFY_TOKENS`` tokens are checked (the float64 reference copies every W_dec row they fire):
    the first ones, or with ``densest`` those with the most non-zeros (their largest L0 is returned). The
    output is returned for reuse only when that was the whole batch. A bias reaches a path only as a
    (D,) vector of W_dec's dtype: any other is added by the dispatcher after the product
    (``inputs.bias_after``).
    """
    with torch.no_grad():
        acts, W, l0 = inputs.acts[:VERIFY_TOKENS].detach(), inputs.W_dec.detach(), None
        if densest:
            counts = torch.count_nonzero(inputs.acts.detach(), dim=1)
            if inputs.n_tokens > VERIFY_TOKENS:
                rows = counts.topk(VERIFY_TOKENS).indices.sort().values
                acts, counts = inputs.acts.detach().index_select(0, rows), counts.index_select(0, rows)
            l0 = int(counts.max()) if counts.numel() else 0
        b = None if inputs.b_dec is None else inputs.b_dec.detach()
        try:
            out = fn(acts, W, b)
        except Exception as exc:  # a compile error, a kernel the templates cannot render, ...
            return Verification(None, f"raised {type(exc).__name__}: {str(exc)[:300]}")
        fired = (acts != 0).any(0).nonzero().flatten()
        verdict = check(out, Reference.of(acts[:, fired], W[fired], b), inputs.out_dtype)
    if not verdict.decided:
        return Verification(None, verdict.reason, decided=False)
    if not verdict.ok:
        return Verification(None, f"wrong result against dense: {verdict.reason}")
    whole = inputs.n_tokens <= VERIFY_TOKENS
    return Verification(out if whole else None, "", l0=l0)
