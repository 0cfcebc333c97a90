"""Generated artefacts on disk: a private folder, atomic writes, and content checked before use.

Every file sae-tune generates (rendered Triton modules, C sources, compiled shared objects) is loaded or
imported only from a folder that no other user can write to, and only after its content matches the hash
of what sae-tune produced. A folder another user can write to is refused, so a file planted there never
runs as the caller.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path


class UnsafeArtefactDir(PermissionError):
    """The folder of generated artefacts can be written by another user, or is not a folder."""


class ArtefactReplaced(UserWarning):
    """A file under the name of a generated artefact did not hold its content and was written anew."""


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``: the content address artefacts are checked against."""
    return hashlib.sha256(data).hexdigest()


def private_dir(path: Path, *, env_var: str | None = None) -> Path:
    """``path`` created with mode 0700 if missing; refused if another user could write to it.

    A folder owned by another user, or writable by group or others (even with the sticky bit, which only
    protects against deletion), could hold a planted file under the name of one of ours. ``env_var`` is
    the environment variable that chooses the folder: errors name it so the user knows how to move it.
    """
    path = Path(path)
    choose = f"; set {env_var} to a folder of your own" if env_var else ""
    other = f" or set {env_var} to a folder of your own" if env_var else " or choose another folder"
    if not path.exists():
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UnsafeArtefactDir(
                f"sae-tune artefact folder {path}: cannot create it ({exc}){choose}"
            ) from None
    try:
        info = path.stat()
    except OSError as exc:
        raise UnsafeArtefactDir(
            f"sae-tune artefact folder {path}: cannot inspect it ({exc}){choose}"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeArtefactDir(f"sae-tune artefact folder {path}: is not a directory{choose}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UnsafeArtefactDir(
            f"sae-tune artefact folder {path}: owned by another user (uid {info.st_uid}); generated code is "
            f"only loaded from a folder of your own{choose}"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeArtefactDir(
            f"sae-tune artefact folder {path}: writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):o}), so another user could plant code in it; "
            f"run `chmod go-w {path}`{other}"
        )
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Concurrent writers of the same content are safe: each rename installs a complete file.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_if_matches(path: Path, expected_sha256: str) -> bytes | None:
    """The bytes of ``path`` when it is a regular file whose sha256 is ``expected_sha256``, else None.

    The file is opened without following a symbolic link and checked on the open descriptor, so the bytes
    that are hashed are the bytes returned: use them, not a second read of ``path``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # missing, a symbolic link (ELOOP), unreadable: not a file of ours
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        data = handle.read()
    return data if sha256_hex(data) == expected_sha256 else None
