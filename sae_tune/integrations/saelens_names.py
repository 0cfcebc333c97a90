"""The SAELens modules and classes sae-tune wraps, named apart from the wrappers (which import torch).

``import sae_tune`` watches for these modules to be imported; naming them here keeps that import light
(the ``sae-tune`` command line starts without torch). ``saelens`` wraps them once SAELens is imported.
"""

from __future__ import annotations

# module -> classes whose ``decode`` is wrapped (subclasses that do not override decode inherit it)
DECODE_CLASSES = {
    "sae_lens.saes.standard_sae": ("StandardSAE",),
    "sae_lens.saes.jumprelu_sae": ("JumpReLUSAE",),
    "sae_lens.saes.topk_sae": ("TopKSAE",),
    # GatedSAE gates in its encoder only; its decode is the standard SAE's (matmul + b_dec, then hooks)
    "sae_lens.saes.gated_sae": ("GatedSAE",),
}
TOPK_ACTIVATION = ("sae_lens.saes.topk_sae", "TopK")
# the modules watched: every module that defines a wrapped class
MODULES = tuple(DECODE_CLASSES)
