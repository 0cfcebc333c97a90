"""sae-tune: autotuned sparse decoding for sparse autoencoders.

``sparse_decode(feature_acts, W_dec, b_dec, variant=...)`` computes ``feature_acts @ W_dec + b_dec`` by
gathering only the W_dec rows of fired features. Triton kernels are rendered from templates per
``Variant``; importing this package never needs CUDA or Triton.
"""

__version__ = "0.1.0"

from sae_tune.decode import sparse_decode  # noqa: E402
from sae_tune.triton_support import triton_available  # noqa: E402
from sae_tune.variants import Variant  # noqa: E402

__all__ = ["Variant", "__version__", "sparse_decode", "triton_available"]
