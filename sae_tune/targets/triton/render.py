"""Render a Variant into a Triton module, write it content-addressed, import it.

The file name is a hash of the template text, the template parameters and the package version, so
rendering the same variant twice costs nothing, Triton's own compile cache keeps working across
processes, and a person can open the file and read the kernel. The file's content is checked against
the sha256 of what the template renders before use, and the module runs from that rendered text: a file
edited or planted under the name never runs (see ``sae_tune.artefacts``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.abc
import importlib.util
import json
import linecache
import os
import sys
import warnings
from pathlib import Path
from types import CodeType, ModuleType

from sae_tune import __version__
from sae_tune.artefacts import ArtefactReplaced, read_if_matches, sha256_hex, write_atomic
from sae_tune.paths import kernel_dir, private_kernel_dir
from sae_tune.targets.templating import environment, folder_hash
from sae_tune.targets.triton.variant import ALLOCS, Variant

TEMPLATE_DIR = Path(__file__).parent / "templates"
ENTRY_TEMPLATE = "module.py.jinja"

_env = environment(TEMPLATE_DIR)


@functools.cache
def template_hash() -> str:
    """sha256 over every template's name and text: part of every cache key."""
    return folder_hash(TEMPLATE_DIR)


def _checked_params(variant: Variant) -> dict[str, object]:
    """Template parameters, re-checked: only known words, bools and ints reach the template."""
    if not isinstance(variant, Variant):
        raise TypeError(f"expected a Variant, got {type(variant).__name__}")
    Variant(**dataclasses.asdict(variant))  # validate again: the object may have been tampered with
    params = variant.template_params()
    for key, value in params.items():
        if key == "alloc":
            ok = value in ALLOCS
        elif key in ("fallback", "unroll"):
            ok = type(value) is bool
        else:
            ok = type(value) is int
        if not ok:
            raise ValueError(f"template parameter {key}={value!r} is not allowed")
    return params


def _render_params(params: dict[str, object]) -> str:
    return _env.get_template(ENTRY_TEMPLATE).render(
        **params, version=__version__, template_hash=template_hash()
    )


def _digest(params: dict[str, object]) -> str:
    key = json.dumps(params, sort_keys=True)
    return hashlib.sha256(f"{template_hash()}|{key}|{__version__}".encode()).hexdigest()[:24]


@dataclasses.dataclass(frozen=True)
class Rendered:
    """One generated module: its import name, its source and the sha256 a file of it must match."""

    name: str
    source: str
    sha256: str

    @property
    def file_name(self) -> str:
        return f"{self.name}.py"


_rendered: dict[str, Rendered] = {}


def rendered(variant: Variant) -> Rendered:
    """The generated module of ``variant``, rendered once per process and content address."""
    params = _checked_params(variant)
    digest = _digest(params)
    hit = _rendered.get(digest)
    if hit is None:
        source = _render_params(params)
        hit = Rendered(f"sae_tune_kernel_{digest}", source, sha256_hex(source.encode()))
        _rendered[digest] = hit
    return hit


def render(variant: Variant) -> str:
    """The generated module source for ``variant``."""
    return rendered(variant).source


def module_digest(variant: Variant) -> str:
    """Content address of the rendered module (excludes runtime values such as max_l0 and num_warps)."""
    return _digest(_checked_params(variant))


def module_path(variant: Variant) -> Path:
    """Where the generated file of ``variant`` lives (the folder is not checked or created here)."""
    return kernel_dir() / f"sae_tune_kernel_{module_digest(variant)}.py"


def verified_file(kernel: Rendered, what: str = "kernel module") -> Path:
    """``kernel``'s file in the private kernel folder, holding exactly what the template renders.

    A file under the module's name with other content (edited, truncated, planted) is never used: it is
    written anew, with a warning naming it.
    """
    path = private_kernel_dir() / kernel.file_name
    if read_if_matches(path, kernel.sha256) is None:
        if os.path.lexists(path):
            warnings.warn(
                f"sae-tune: {path} does not hold the {what} sae-tune renders under that name "
                "(edited or planted); it was not run and is rewritten",
                ArtefactReplaced,
                stacklevel=3,
            )
        write_atomic(path, kernel.source.encode())
    return path


def _verified_file(variant: Variant) -> tuple[Path, Rendered]:
    kernel = rendered(variant)
    return verified_file(kernel), kernel


def write_module(variant: Variant) -> Path:
    """Render into the kernel folder unless the file is already there with the right content (atomic,
    safe across processes); the path is for people and Triton's messages, never imported by name."""
    return _verified_file(variant)[0]


class _VerifiedSourceLoader(importlib.abc.InspectLoader):
    """Loads a generated module from source held in memory (checked against its hash), never from disk."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = str(path)
        self.source = source

    def is_package(self, fullname: str) -> bool:
        return False

    def get_source(self, fullname: str) -> str:
        return self.source

    def get_code(self, fullname: str) -> CodeType:
        return compile(self.source, self.path, "exec", dont_inherit=True)


_loaded: dict[str, ModuleType] = {}


def exec_rendered(kernel: Rendered, path: Path) -> ModuleType:
    """Execute ``kernel`` as a module from its rendered text (checked against its hash when ``path`` was
    written), not by reading the file again: the same text is put in ``linecache`` under the file's name,
    and Triton reads a kernel's source through ``inspect``, so what it compiles is what was checked even
    if the file changes afterwards."""
    loader = _VerifiedSourceLoader(path, kernel.source)
    spec = importlib.util.spec_from_loader(kernel.name, loader, origin=str(path))
    assert spec is not None
    spec.has_location = True  # sets __file__: tracebacks and Triton's messages name the file
    module = importlib.util.module_from_spec(spec)
    # mtime None: linecache.checkcache keeps the entry instead of re-reading the file from disk
    linecache.cache[str(path)] = (len(kernel.source), None, kernel.source.splitlines(True), str(path))
    sys.modules[kernel.name] = module  # Triton reads the kernels' source through the module
    try:
        loader.exec_module(module)
    except BaseException:
        sys.modules.pop(kernel.name, None)
        raise
    return module


def load_module(variant: Variant) -> ModuleType:
    """Import the generated module of ``variant`` (rendered, checked and written on first use)."""
    kernel = rendered(variant)
    loaded = _loaded.get(kernel.name)
    if loaded is not None:
        return loaded
    path, kernel = _verified_file(variant)
    loaded = _loaded[kernel.name] = exec_rendered(kernel, path)
    return loaded
