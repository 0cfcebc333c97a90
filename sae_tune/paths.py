"""Where sae-tune keeps files on the user's machine (platformdirs), with environment overrides."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def user_cache_dir() -> Path:
    """Root of sae-tune's cache: generated kernels, the tuning database."""
    return Path(platformdirs.user_cache_dir("sae-tune", appauthor=False))


def kernel_dir() -> Path:
    """Folder of rendered kernel modules; ``SAE_TUNE_KERNEL_DIR`` overrides."""
    override = os.environ.get("SAE_TUNE_KERNEL_DIR")
    return Path(override) if override else user_cache_dir() / "kernels"
