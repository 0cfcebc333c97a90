"""Compile rendered C into a shared object, keep it content-addressed on disk, load it after checking it.

Compiler: ``$CC`` or ``cc``. Flags are probed once per process (and remembered on disk per compiler and
CPU): ``-O3 <native> -fopenmp``, then without ``<native>``, then serial builds without ``-fopenmp`` (with
and without ``<native>``), where ``<native>`` is this architecture's flag for "the CPU building it"
(``-march=native`` on x86, ``-mcpu=native`` on ARM and POWER, where ``-march=native`` does not exist).
A serial build runs every kernel on one thread. A compiler that runs past ``COMPILE_TIMEOUT_S`` is killed
with everything it started (its own process group) and the build fails with that message.

On disk, in ``kernel_dir()/c`` (a private 0700 folder, see ``sae_tune.artefacts``):
  <key>.c                 the source, for people to read
  <key>-<so hash>.so      the compiled object, named by its own content too
  <key>.json              manifest: the key, compiler, flags and the .so's sha256
where <key> is the sha256 of (source, compiler identity, flags, CPU identity). Every file is written
through a temporary name and a rename, so concurrent builders of the same kernel never see half a file.

The CPU identity (``sae_tune.cpu_identity.cpu_key_name``: architecture, model, generation, extensions) is
part of every key and of the probe record's name, because ``<native>`` objects only run on the CPU that
built them: in a kernel folder shared between machines (a home directory on NFS across Intel and AMD
nodes) an AVX-512 object loaded on an AVX2 node dies with SIGILL. Another CPU finds other keys, so it
builds its own objects; a manifest or probe record that names another CPU is never trusted.

Loading: the manifest must name this key and this CPU, and the .so's bytes must hash to the manifest's
sha256; otherwise the kernel is rebuilt with a warning. The verified bytes are then written to a fresh
private temporary file and that copy is dlopen'ed and unlinked: what runs is exactly what was hashed,
whatever happens to the cache file between the check and the load (no time-of-check/time-of-use window).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sae_tune.artefacts import private_dir, read_if_matches, sha256_hex, write_atomic
from sae_tune.cpu_identity import cpu_key_name
from sae_tune.paths import KERNEL_DIR_ENV, kernel_dir, private_kernel_dir

BASE_FLAGS = ("-O3", "-fPIC", "-shared")
# platform.machine() -> the flag that targets the building CPU; architectures not named get no such flag
_NATIVE_FLAGS = {
    **dict.fromkeys(("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"), "-march=native"),
    **dict.fromkeys(("aarch64", "arm64", "armv7l", "armv8l", "ppc64", "ppc64le"), "-mcpu=native"),
    "s390x": "-march=native",
}


def native_flag(machine: str | None = None) -> str | None:
    """The flag that makes gcc and clang generate code for the building CPU on ``machine`` (this one by
    default): ``-march=native`` on x86, ``-mcpu=native`` on ARM and POWER; None where there is none."""
    machine = platform.machine() if machine is None else machine
    return _NATIVE_FLAGS.get(machine.lower())


def flag_sets(machine: str | None = None) -> tuple[tuple[str, ...], ...]:
    """The flag sets tried in order on ``machine``: native + OpenMP, OpenMP, native serial, serial."""
    native = native_flag(machine)
    if native is None:
        return (BASE_FLAGS + ("-fopenmp",), BASE_FLAGS)
    return (
        BASE_FLAGS + (native, "-fopenmp"),
        BASE_FLAGS + ("-fopenmp",),
        BASE_FLAGS + (native,),
        BASE_FLAGS,
    )


# Tried in order; the first the compiler accepts (and that builds the OpenMP probe) is used. A probe
# record on disk may only select one of these: it can never add a flag.
FLAG_SETS: tuple[tuple[str, ...], ...] = flag_sets()
COMPILE_TIMEOUT_S = 120.0  # seconds one compiler run may take (tests lower it)
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
    """A C compiler found on this machine, the flags it accepted, and the CPU they were probed on."""

    command: tuple[str, ...]
    identity: str
    flags: tuple[str, ...]
    cpu: str

    @property
    def openmp(self) -> bool:
        """Whether kernels are built with OpenMP; without it every kernel runs on one thread."""
        return "-fopenmp" in self.flags


SERIAL_NOTE = "serial build (no OpenMP): 1 thread"  # what explain() says of a serial build


def cpu_identity() -> str:
    """This CPU's key name (``sae_tune.cpu_identity.cpu_key_name``: its digest covers the architecture,
    generation and vector extensions): what built objects and probe records are keyed by, since native
    code runs only on the CPU it was built for."""
    return cpu_key_name()


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


class CompilerTimeout(Exception):
    """The compiler ran past ``COMPILE_TIMEOUT_S`` and was killed."""


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a compiler in its own process group; past the timeout the whole group is killed (a compiler
    driver's children, cc1 and ld, would otherwise keep running and hold its output pipes open)."""
    timeout = COMPILE_TIMEOUT_S
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise CompilerTimeout(f"{args[0]} ran for more than {timeout:g} s and was killed") from None
    except BaseException:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (AttributeError, ProcessLookupError, PermissionError):  # no process groups, or already gone
        proc.kill()
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # something outside the group holds its pipes: stop reading them
        proc.wait()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _failure(command: tuple[str, ...], done: subprocess.CompletedProcess[str]) -> str:
    """What a failed compiler run said, and how it ended when it died of a signal (a crash)."""
    output = f"{done.stdout}\n{done.stderr}".strip()
    code = done.returncode
    if code < 0:
        how = f"{command[0]} was killed by {_signal_name(-code)} (it crashed)"
    elif code - 128 in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGFPE):
        how = f"{command[0]} exited with status {code} (a crash: {_signal_name(code - 128)})"
    else:
        how = f"{command[0]} exited with status {code}"
    return f"{how}\n{output}" if output else how


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
        except CompilerTimeout as exc:
            return b"", str(exc)
        except OSError as exc:
            return b"", f"{command[0]} could not run: {exc}"
        if done.returncode != 0:
            return b"", _failure(command, done)
        try:
            return Path(so_path).read_bytes(), ""
        except OSError as exc:
            return b"", f"{command[0]} reported success but wrote no shared object: {exc}"
    finally:
        Path(c_path).unlink(missing_ok=True)
        Path(so_path).unlink(missing_ok=True)


@functools.cache
def _probe(command: tuple[str, ...], cpu: str) -> Compiler | str:
    """The compiler with its flags, or why none works. Remembered on disk per compiler identity and CPU."""
    try:
        version = _run([*command, "--version"])
    except (OSError, CompilerTimeout) as exc:
        return f"C compiler {command[0]} cannot run: {exc}"
    if version.returncode < 0:  # killed by a signal: it crashed (a non-zero status alone is tolerated)
        return f"C compiler {command[0]} cannot run: {_trim(_failure(command, version))}"
    first_line = (version.stdout or version.stderr).strip().splitlines()
    identity = f"{command} {first_line[0] if first_line else '(no --version output)'}"
    folder = _c_dir()
    record = folder / f"probe-{sha256_hex(chr(0).join([identity, cpu]).encode())[:32]}.json"
    try:
        saved = json.loads(record.read_text())
        # only one of our own flag sets is accepted back (the file can never add a flag), and only for
        # this compiler on this CPU (native flags another CPU accepted may not build here)
        if (
            saved.get("identity") == identity
            and saved.get("cpu") == cpu
            and tuple(saved.get("flags", ())) in FLAG_SETS
        ):
            return Compiler(command, identity, tuple(saved["flags"]), cpu)
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    errors = []
    for flags in FLAG_SETS:
        data, error = _compile(command, flags, _PROBE_SOURCE, folder)
        if data:
            saved = {"identity": identity, "cpu": cpu, "flags": list(flags)}
            write_atomic(record, json.dumps(saved).encode())
            return Compiler(command, identity, flags, cpu)
        errors.append(f"{' '.join(flags)}:\n{_trim(error)}")
    return f"C compiler {command[0]} cannot build a shared object:\n" + "\n".join(errors)


def compiler() -> Compiler | str:
    """The usable compiler (probed once per process, compiler and CPU), or a sentence saying why there is
    none."""
    command, origin = _compiler_command()
    if command is None:
        return f"no C compiler found: {origin} is not an executable on PATH (set $CC to a C compiler)"
    return _probe(command, cpu_identity())


def _key(source: str, cc: Compiler) -> str:
    return sha256_hex("\0".join([source, cc.identity, " ".join(cc.flags), cc.cpu]).encode())


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


def _cached_bytes(folder: Path, key: str, cpu: str) -> bytes | None:
    """The verified .so bytes for ``key`` from disk, None when absent, or None with a warning if altered
    (or built for another CPU than ``cpu``)."""
    manifest_path = folder / f"{key}.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        so_sha = manifest["so_sha256"]
        ok = (
            manifest["key"] == key
            and manifest["cpu"] == cpu
            and isinstance(so_sha, str)
            and len(so_sha) == 64
        )
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
    key = _key(source, cc)
    with _lock:
        kernel = _loaded.get(key)
        if kernel is not None:
            return kernel
        folder = _c_dir()
        data = _cached_bytes(folder, key, cc.cpu)
        if data is None:
            data, error = _compile(cc.command, cc.flags, source, folder)
            if not data:
                raise CpuBuildError(
                    f"{cc.command[0]} failed to compile a sae-tune CPU kernel:\n{_trim(error)}"
                )
            so_sha = sha256_hex(data)
            write_atomic(folder / f"{key}.c", source.encode())
            write_atomic(folder / f"{key}-{so_sha[:16]}.so", data)
            manifest = {
                "key": key,
                "so_sha256": so_sha,
                "compiler": cc.identity,
                "flags": list(cc.flags),
                "cpu": cc.cpu,
            }
            write_atomic(folder / f"{key}.json", json.dumps(manifest, indent=1).encode())
        kernel = _dlopen_verified(data, key, folder, signatures)
        _loaded[key] = kernel
        return kernel


def artefact_paths(source: str) -> dict[str, Path] | None:
    """Where the files of ``source``'s kernel live (for show-kernel --path), or None without a compiler."""
    cc = compiler()
    if isinstance(cc, str):
        return None
    key = _key(source, cc)
    folder = kernel_dir() / "c"
    return {"source": folder / f"{key}.c", "manifest": folder / f"{key}.json"}
