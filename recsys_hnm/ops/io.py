"""Files written whole or not at all."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename it over ``path``:
    a crash never leaves a half-written file where a later run would read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    # created like open() would (0o666 minus the umask); tempfile.mkstemp would make every output 0600
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(path: str | Path, suffixes: tuple[str, ...] | None = None) -> None:
    """Refuse, before any work, an output ``atomic_write`` could not write: a wrong suffix, a
    directory in the way, or a nearest existing ancestor that is not a writable directory."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{path}: output must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"{path}: output is a directory")
    parent = path.absolute().parent
    while not parent.exists():  # atomic_write creates the missing directories
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: cannot create a directory under {parent}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: directory {parent} is not writable")
