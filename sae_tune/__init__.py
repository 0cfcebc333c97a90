"""sae-tune: autotuned sparse decoding for sparse autoencoders.

``sparse_decode(feature_acts, W_dec, b_dec)`` computes ``feature_acts @ W_dec + b_dec`` by the fastest
correct path known for the device and SAE shape (``explain`` says which and why), or through a given
``Variant``. ``sparse_encode`` computes an SAE's activations straight into a ``SparseActs`` (CSR), which
``sparse_decode`` decodes without scanning. Importing this package never needs CUDA or Triton; it
routes SAELens decoders through the dispatcher (and their forwards sparse end to end) unless
``SAE_TUNE_AUTOPATCH=0`` (``patch``, ``unpatch`` and ``patched`` do it by hand).
"""

__version__ = "0.1.0"

from sae_tune.decode import sparse_decode  # noqa: E402
from sae_tune.dispatch import Decision, explain  # noqa: E402
from sae_tune.encode import sparse_encode  # noqa: E402
from sae_tune.integrations import autopatch as _autopatch  # noqa: E402
from sae_tune.integrations import patch, patched, unpatch, unpatched  # noqa: E402
from sae_tune.integrations.saelens_sparse import sparse_features  # noqa: E402
from sae_tune.sparse_acts import SparseActs  # noqa: E402
from sae_tune.targets.triton.support import triton_available  # noqa: E402
from sae_tune.targets.triton.variant import Variant  # noqa: E402

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
