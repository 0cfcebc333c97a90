"""sae-tune: autotuned sparse decoding for sparse autoencoders.

``sparse_decode(feature_acts, W_dec, b_dec)`` computes ``feature_acts @ W_dec + b_dec`` by the fastest
correct path known for the device and SAE shape (``explain`` says which and why), or through a given
``Variant``. ``sparse_encode`` computes an SAE's activations straight into a ``SparseActs`` (CSR), which
``sparse_decode`` decodes without scanning. Importing this package never needs CUDA or Triton; it
routes SAELens decoders through the dispatcher (and their forwards sparse end to end) unless
``SAE_TUNE_AUTOPATCH=0`` (``patch``, ``unpatch`` and ``patched`` do it by hand).

The names below are imported on first use (PEP 562), so that ``import sae_tune`` and the ``sae-tune``
commands that need no tensor (``--help``, ``list``) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from sae_tune import forksafe as _forksafe  # noqa: E402, F401 (light: registers the fork hook)
from sae_tune.integrations import autopatch as _autopatch  # noqa: E402 (light: torch comes with sae_lens)
from sae_tune.integrations import patch, patched, unpatch, unpatched  # noqa: E402

# public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "sparse_decode": "sae_tune.decode",
    "Decision": "sae_tune.dispatch",
    "explain": "sae_tune.dispatch",
    "sparse_encode": "sae_tune.encode",
    "sparse_features": "sae_tune.integrations.saelens_sparse",
    "SparseActs": "sae_tune.sparse_acts",
    "triton_available": "sae_tune.targets.triton.support",
    "Variant": "sae_tune.targets.triton.variant",
}

if TYPE_CHECKING:
    from sae_tune.decode import sparse_decode
    from sae_tune.dispatch import Decision, explain
    from sae_tune.encode import sparse_encode
    from sae_tune.integrations.saelens_sparse import sparse_features
    from sae_tune.sparse_acts import SparseActs
    from sae_tune.targets.triton.support import triton_available
    from sae_tune.targets.triton.variant import Variant


def __getattr__(name: str) -> Any:
    """A public name (imported now, then kept), or a submodule such as ``sae_tune.dispatch``."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


_autopatch()

__all__ = [
    "Decision",
    "SparseActs",
    "Variant",
    "__version__",
    "explain",
    "patch",
    "patched",
    "sparse_decode",
    "sparse_encode",
    "sparse_features",
    "triton_available",
    "unpatch",
    "unpatched",
]
