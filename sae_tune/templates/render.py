"""Render a Variant into a Triton module, write it content-addressed, import it.

The file name is a hash of the template text, the template parameters and the package version, so
rendering the same variant twice costs nothing, Triton's own compile cache keeps working across
processes, and a person can open the file and read the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import jinja2

from sae_tune import __version__
from sae_tune.paths import kernel_dir
from sae_tune.variants import ALLOCS, Variant

TEMPLATE_DIR = Path(__file__).parent
ENTRY_TEMPLATE = "module.py.jinja"

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,
)


@functools.cache
def template_hash() -> str:
    """sha256 over every template's name and text: part of every cache key."""
    digest = hashlib.sha256()
    for path in sorted(TEMPLATE_DIR.glob("*.jinja")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _checked_params(variant: Variant) -> dict[str, object]:
    """Template parameters, re-checked: only known words, bools and ints reach the template."""
    if not isinstance(variant, Variant):
        raise TypeError(f"expected a Variant, got {type(variant).__name__}")
    Variant(**dataclasses.asdict(variant))  # validate again: the object may have been tampered with
    params = variant.template_params()
    for key, value in params.items():
        if key == "alloc":
            ok = value in ALLOCS
        elif key == "fallback":
            ok = type(value) is bool
        else:
            ok = type(value) is int
        if not ok:
            raise ValueError(f"template parameter {key}={value!r} is not allowed")
    return params


def render(variant: Variant) -> str:
    """The generated module source for ``variant``."""
    params = _checked_params(variant)
    return _env.get_template(ENTRY_TEMPLATE).render(
        **params, version=__version__, template_hash=template_hash()
    )


def module_digest(variant: Variant) -> str:
    """Content address of the rendered module (excludes runtime values such as max_l0 and num_warps)."""
    key = json.dumps(_checked_params(variant), sort_keys=True)
    return hashlib.sha256(f"{template_hash()}|{key}|{__version__}".encode()).hexdigest()[:24]


def module_path(variant: Variant) -> Path:
    return kernel_dir() / f"sae_tune_kernel_{module_digest(variant)}.py"


def write_module(variant: Variant) -> Path:
    """Render into the kernel folder unless the file is already there (atomic, safe across processes)."""
    path = module_path(variant)
    if path.exists():
        return path
    source = render(variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    with os.fdopen(fd, "w") as handle:
        handle.write(source)
    os.replace(tmp, path)
    return path


_loaded: dict[str, ModuleType] = {}


def load_module(variant: Variant) -> ModuleType:
    """Import the generated module of ``variant`` (rendered and written on first use)."""
    digest = module_digest(variant)
    module = _loaded.get(digest)
    if module is not None:
        return module
    path = write_module(variant)
    name = f"sae_tune_kernel_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Triton reads the kernels' source through the module
    spec.loader.exec_module(module)
    _loaded[digest] = module
    return module
