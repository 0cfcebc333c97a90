"""Where sae-tune keeps files on the user's machine (platformdirs), with environment overrides."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from sae_tune.artefacts import private_dir

KERNEL_DIR_ENV = "SAE_TUNE_KERNEL_DIR"


def user_cache_dir() -> Path:
    """Root of sae-tune's cache: generated kernels, the tuning database."""
    return Path(platformdirs.user_cache_dir("sae-tune", appauthor=False))


def kernel_dir() -> Path:
    """Folder of rendered kernel modules; ``SAE_TUNE_KERNEL_DIR`` overrides. Not checked: see below."""
    override = os.environ.get(KERNEL_DIR_ENV)
    return Path(override) if override else user_cache_dir() / "kernels"


def private_kernel_dir() -> Path:
    """The kernel folder, created 0700, refused when another user could write to it (generated code is
    loaded from it), with an error naming ``SAE_TUNE_KERNEL_DIR``."""
    return private_dir(kernel_dir(), env_var=KERNEL_DIR_ENV)
