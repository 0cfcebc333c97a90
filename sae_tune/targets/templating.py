"""What every generated target's templates share: a strict Jinja environment and a hash of the text."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jinja2


def environment(folder: Path) -> jinja2.Environment:
    """Templates of ``folder``: an undefined name is an error (StrictUndefined), nothing is escaped (the
    output is source code, and only validated words and ints reach it)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def folder_hash(folder: Path) -> str:
    """sha256 over every template's name and text in ``folder``: part of every cache key."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.jinja")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
