"""Automatic dispatch for libraries that decode SAEs (SAELens).

``import sae_tune`` calls ``autopatch()``: SAELens SAEs decode through the dispatcher whether ``sae_lens``
was imported before or after ``sae_tune`` (a post-import hook waits for it; nothing imports it early).
``SAE_TUNE_AUTOPATCH=0`` turns that off; ``patch()``, ``unpatch()`` and ``patched()`` do it by hand.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

from sae_tune.integrations.post_import import PostImportFinder, install, uninstall
from sae_tune.integrations.saelens_names import MODULES as SAELENS_MODULES

ENV_AUTOPATCH = "SAE_TUNE_AUTOPATCH"
_OFF = ("0", "false", "no", "off")


def _saelens() -> ModuleType:
    """The SAELens wrappers, imported when a SAELens module is there to wrap (they import torch, which
    ``import sae_tune`` and the command line leave out until something needs it)."""
    from sae_tune.integrations import saelens

    return saelens


def _patch_on_import(module: ModuleType) -> None:
    _saelens().patch_module(module)


_finder = PostImportFinder({name: _patch_on_import for name in SAELENS_MODULES})
_lock = threading.RLock()
_wanted = False


def _each_loaded_module(action: str) -> tuple[str, ...]:
    """``saelens.<action>`` on every SAELens module already imported; the names it changed."""
    done: list[str] = []
    for name in SAELENS_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            done += getattr(_saelens(), action)(module)
    return tuple(done)


def patch() -> tuple[str, ...]:
    """Route SAELens decoders through sae-tune: now for what is imported, at import for the rest.

    Returns the names wrapped now (empty when sae_lens is not imported yet; it is patched on import).
    """
    global _wanted
    with _lock:
        _wanted = True
        install(_finder)
        return _each_loaded_module("patch_module")


def unpatch() -> tuple[str, ...]:
    """Restore SAELens's own decoders and stop patching modules imported later."""
    global _wanted
    with _lock:
        _wanted = False
        uninstall(_finder)
        return _each_loaded_module("unpatch_module")


def is_active() -> bool:
    """Whether SAELens decoders are (or will be, on import) routed through sae-tune."""
    return _wanted


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """``with sae_tune.patched():`` routes SAELens decoders inside the block, then restores the state."""
    with _lock:
        was = _wanted
        patch()
    try:
        yield
    finally:
        if not was:
            unpatch()


@contextlib.contextmanager
def unpatched() -> Iterator[None]:
    """``with sae_tune.unpatched():`` SAELens's own decoders inside the block (e.g. for a comparison)."""
    with _lock:
        was = _wanted
        unpatch()
    try:
        yield
    finally:
        if was:
            patch()


def autopatch() -> bool:
    """``patch()`` unless ``SAE_TUNE_AUTOPATCH`` is 0/false/no/off; never raises (import must work)."""
    if os.environ.get(ENV_AUTOPATCH, "1").strip().lower() in _OFF:
        return False
    try:
        patch()
    except Exception as exc:  # a changed SAELens must not break `import sae_tune`
        import warnings

        warnings.warn(f"sae-tune could not patch SAELens ({exc}); decoding as before", stacklevel=2)
        return False
    return True


__all__ = ["autopatch", "is_active", "patch", "patched", "unpatch", "unpatched"]
