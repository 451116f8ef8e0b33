"""Files written atomically and files fingerprinted by their bytes (SHA-256)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[str], Any]) -> Path:
    """Write ``data`` (text, bytes, or a ``write(tmp_path)`` callable) to a temporary file next
    to ``path``, then rename it over ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        if isinstance(data, str):
            Path(tmp).write_text(data, encoding="utf-8")
        elif isinstance(data, bytes):
            Path(tmp).write_bytes(data)
        else:
            data(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
