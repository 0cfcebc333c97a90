"""Runtime dispatch: a decode without an explicit variant takes the fastest correct path known here.

``explain`` says which path a call takes and why; ``reload`` re-reads the tuned configs. See
``sae_tune.dispatch.dispatcher`` for the lookup order, ``runtime`` for overflow safety and verification,
``grad`` for gradients and ``costmodel`` for untuned shapes.
"""

from sae_tune.dispatch.decision import Decision, DispatchWarning
from sae_tune.dispatch.dispatcher import Dispatcher, decode, explain, get_dispatcher, reload, set_dispatcher

__all__ = [
    "Decision",
    "DispatchWarning",
    "Dispatcher",
    "decode",
    "explain",
    "get_dispatcher",
    "reload",
    "set_dispatcher",
]
