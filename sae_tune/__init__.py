"""sae-tune: autotuned sparse decoding for sparse autoencoders.

``sparse_decode(feature_acts, W_dec, b_dec)`` computes ``feature_acts @ W_dec + b_dec`` by the fastest
correct path known for the device and SAE shape (``explain`` says which and why), or through a given
``Variant``. Importing this package never needs CUDA or Triton; it routes SAELens decoders through the
dispatcher unless ``SAE_TUNE_AUTOPATCH=0`` (``patch``, ``unpatch`` and ``patched`` do it by hand).
"""

__version__ = "0.1.0"

from sae_tune.decode import sparse_decode  # noqa: E402
from sae_tune.dispatch import Decision, explain  # noqa: E402
from sae_tune.integrations import autopatch as _autopatch  # noqa: E402
from sae_tune.integrations import patch, patched, unpatch, unpatched  # noqa: E402
from sae_tune.targets.triton.support import triton_available  # noqa: E402
from sae_tune.targets.triton.variant import Variant  # noqa: E402

_autopatch()

__all__ = [
    "Decision",
    "Variant",
    "__version__",
    "explain",
    "patch",
    "patched",
    "sparse_decode",
    "triton_available",
    "unpatch",
    "unpatched",
]
