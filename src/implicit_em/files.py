"""Writing files atomically: a crash mid-write leaves the previous file intact, never a truncated one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], fsync: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``; on any failure the
    temporary file is removed and ``path`` is untouched. ``fsync`` also flushes it to disk first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_safetensors(path: str | Path) -> dict:
    """The tensors of a safetensors file; an unreadable one is refused with one line (never code: no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from implicit_em.errors import DataError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e.__class__.__name__}); re-create it") from None
