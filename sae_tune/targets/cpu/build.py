"""Compile rendered C into a shared object, keep it content-addressed on disk, load it after checking it.

Compiler: ``$CC`` or ``cc``. Flags are probed once per process (and remembered on disk per compiler):
``-O3 -march=native -fopenmp``, then without ``-march=native``, then a serial build without ``-fopenmp``.

On disk, in ``kernel_dir()/c`` (a private 0700 folder, see ``sae_tune.artefacts``):
  <key>.c                 the source, for people to read
  <key>-<so hash>.so      the compiled object, named by its own content too
  <key>.json              manifest: the key, compiler, flags and the .so's sha256
where <key> is the sha256 of (source, compiler identity, flags). Every file is written through a
temporary name and a rename, so concurrent builders of the same kernel never see half a file.

Loading: the manifest must name this key, and the .so's bytes must hash to the manifest's sha256;
otherwise the kernel is rebuilt with a warning. The verified bytes are then written to a fresh private
temporary file and that copy is dlopen'ed and unlinked: what runs is exactly what was hashed, whatever
happens to the cache file between the check and the load (no time-of-check/time-of-use window).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sae_tune.artefacts import private_dir, read_if_matches, sha256_hex, write_atomic
from sae_tune.paths import KERNEL_DIR_ENV, kernel_dir, private_kernel_dir

BASE_FLAGS = ("-O3", "-fPIC", "-shared")
# Tried in order; the first the compiler accepts (and that builds the OpenMP probe) is used.
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    BASE_FLAGS + ("-march=native", "-fopenmp"),
    BASE_FLAGS + ("-fopenmp",),
    BASE_FLAGS,
)
COMPILE_TIMEOUT_S = 120
_MESSAGE_LIMIT = 4000

_PROBE_SOURCE = """
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
int sae_tune_probe(int64_t n, float *x)
{
#ifdef _OPENMP
#pragma omp parallel for num_threads(2) schedule(dynamic)
#endif
    for (int64_t i = 0; i < n; i++)
        x[i] = x[i] * 2.0f + 1.0f;
    return 0;
}
"""


class CpuBuildError(RuntimeError):
    """The C compiler could not build a kernel; the message holds its (trimmed) output."""


@dataclass(frozen=True)
class Compiler:
    """A C compiler found on this machine and the flags it accepted."""

    command: tuple[str, ...]
    identity: str
    flags: tuple[str, ...]

    @property
    def openmp(self) -> bool:
        return "-fopenmp" in self.flags


# A C entry point's ctypes signature: (argument types, return type).
Signature = tuple[tuple[type, ...], type]
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
DECODE_ENTRY = "sae_tune_decode"
DECODE_SIGNATURES: dict[str, Signature] = {
    DECODE_ENTRY: (
        (_I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, ctypes.c_int32),
        ctypes.c_int,
    ),
}


@dataclass(frozen=True)
class CpuKernel:
    """A loaded kernel: its C entry points and what it was built from. ``fn`` is the first entry point
    (the decode's); ``entries`` holds every bound one by name."""

    key: str
    fn: ctypes._CFuncPtr
    name: str
    openmp: bool
    lib: ctypes.CDLL
    entries: Mapping[str, ctypes._CFuncPtr] = field(default_factory=dict)


def _trim(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MESSAGE_LIMIT else "...\n" + text[-_MESSAGE_LIMIT:]


def _c_dir() -> Path:
    """The C folder inside the kernel folder, both private (the parent is checked first: a private
    subfolder of a folder others can write to could be swapped by them)."""
    return private_dir(private_kernel_dir() / "c", env_var=KERNEL_DIR_ENV)


def _compiler_command() -> tuple[tuple[str, ...] | None, str]:
    """The compiler command line (or None) and where it came from, for messages."""
    raw = os.environ.get("CC")
    origin = f"$CC={raw!r}" if raw else "'cc'"
    try:
        parts = shlex.split(raw) if raw else ["cc"]
    except ValueError:
        return None, origin
    if not parts:
        return None, origin
    found = shutil.which(parts[0])
    return ((found, *parts[1:]) if found else None), origin


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)


def _compile(
    command: tuple[str, ...], flags: tuple[str, ...], source: str, folder: Path
) -> tuple[bytes, str]:
    """(shared object bytes, "") on success, (b"", compiler output) on failure. Temporaries are removed."""
    fd, c_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".c")
    with os.fdopen(fd, "w") as handle:
        handle.write(source)
    so_path = c_path[:-2] + ".so"
    try:
        try:
            done = _run([*command, *flags, "-o", so_path, c_path])
        except (OSError, subprocess.TimeoutExpired) as exc:
            return b"", f"{command[0]} could not run: {exc}"
        if done.returncode != 0:
            return b"", f"{done.stdout}\n{done.stderr}"
        return Path(so_path).read_bytes(), ""
    finally:
        Path(c_path).unlink(missing_ok=True)
        Path(so_path).unlink(missing_ok=True)


@functools.cache
def _probe(command: tuple[str, ...]) -> Compiler | str:
    """The compiler with its flags, or why none works. Remembered on disk per compiler identity."""
    try:
        version = _run([*command, "--version"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"C compiler {command[0]} cannot run: {exc}"
    first_line = (version.stdout or version.stderr).strip().splitlines()
    identity = f"{command} {first_line[0] if first_line else '(no --version output)'}"
    folder = _c_dir()
    record = folder / f"probe-{sha256_hex(identity.encode())[:32]}.json"
    try:
        saved = json.loads(record.read_text())
        # only one of our own flag sets is accepted back: the file can never add a flag
        if saved.get("identity") == identity and tuple(saved.get("flags", ())) in FLAG_SETS:
            return Compiler(command, identity, tuple(saved["flags"]))
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    errors = []
    for flags in FLAG_SETS:
        data, error = _compile(command, flags, _PROBE_SOURCE, folder)
        if data:
            write_atomic(record, json.dumps({"identity": identity, "flags": list(flags)}).encode())
            return Compiler(command, identity, flags)
        errors.append(f"{' '.join(flags)}:\n{_trim(error)}")
    return f"C compiler {command[0]} cannot build a shared object:\n" + "\n".join(errors)


def compiler() -> Compiler | str:
    """The usable compiler (probed once per process and compiler), or a sentence saying why there is none."""
    command, origin = _compiler_command()
    if command is None:
        return f"no C compiler found: {origin} is not an executable on PATH (set $CC to a C compiler)"
    return _probe(command)


_loaded: dict[str, CpuKernel] = {}
_lock = threading.Lock()


def forget_loaded() -> None:
    """Drop this process's table of loaded kernels (the next build checks the disk again)."""
    with _lock:
        _loaded.clear()


def _dlopen_verified(data: bytes, key: str, folder: Path, signatures: Mapping[str, Signature]) -> CpuKernel:
    """Load exactly ``data``: a private copy is written, loaded and unlinked (the mapping stays)."""
    fd, path = tempfile.mkstemp(dir=folder, prefix=".load-", suffix=".so")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        lib = ctypes.CDLL(path)
    finally:
        Path(path).unlink(missing_ok=True)
    entries = {}
    for entry, (argtypes, restype) in signatures.items():
        fn = getattr(lib, entry)
        fn.argtypes = list(argtypes)
        fn.restype = restype
        entries[entry] = fn
    lib.sae_tune_kernel_name.restype = ctypes.c_char_p
    name = lib.sae_tune_kernel_name().decode()
    first = next(iter(entries.values()))
    return CpuKernel(key, first, name, bool(lib.sae_tune_openmp()), lib, entries)


def _cached_bytes(folder: Path, key: str) -> bytes | None:
    """The verified .so bytes for ``key`` from disk, None when absent, or None with a warning if altered."""
    manifest_path = folder / f"{key}.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        so_sha = manifest["so_sha256"]
        ok = manifest["key"] == key and isinstance(so_sha, str) and len(so_sha) == 64
    except (OSError, ValueError, KeyError, TypeError):
        ok, so_sha = False, ""
    data = read_if_matches(folder / f"{key}-{so_sha[:16]}.so", so_sha) if ok else None
    if data is None:
        warnings.warn(
            f"sae-tune: the compiled CPU kernel {key[:16]} in {folder} does not match its manifest "
            "(changed or damaged); rebuilding it",
            RuntimeWarning,
            stacklevel=4,
        )
    return data


def build_source(source: str, signatures: Mapping[str, Signature] = DECODE_SIGNATURES) -> CpuKernel:
    """Compile ``source`` (or take the verified copy on disk) and load it, binding the entry points of
    ``signatures`` (the decode's by default); cached per process. Every source also exports
    ``sae_tune_kernel_name`` and ``sae_tune_openmp``."""
    cc = compiler()
    if isinstance(cc, str):
        raise CpuBuildError(cc)
    key = sha256_hex("\0".join([source, cc.identity, " ".join(cc.flags)]).encode())
    with _lock:
        kernel = _loaded.get(key)
        if kernel is not None:
            return kernel
        folder = _c_dir()
        data = _cached_bytes(folder, key)
        if data is None:
            data, error = _compile(cc.command, cc.flags, source, folder)
            if not data:
                raise CpuBuildError(
                    f"{cc.command[0]} failed to compile a sae-tune CPU kernel:\n{_trim(error)}"
                )
            so_sha = sha256_hex(data)
            write_atomic(folder / f"{key}.c", source.encode())
            write_atomic(folder / f"{key}-{so_sha[:16]}.so", data)
            manifest = {"key": key, "so_sha256": so_sha, "compiler": cc.identity, "flags": list(cc.flags)}
            write_atomic(folder / f"{key}.json", json.dumps(manifest, indent=1).encode())
        kernel = _dlopen_verified(data, key, folder, signatures)
        _loaded[key] = kernel
        return kernel


def artefact_paths(source: str) -> dict[str, Path] | None:
    """Where the files of ``source``'s kernel live (for show-kernel --path), or None without a compiler."""
    cc = compiler()
    if isinstance(cc, str):
        return None
    key = sha256_hex("\0".join([source, cc.identity, " ".join(cc.flags)]).encode())
    folder = kernel_dir() / "c"
    return {"source": folder / f"{key}.c", "manifest": folder / f"{key}.json"}
