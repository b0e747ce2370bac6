"""Checkpoints: atomic writes, loads that never run code, and finding the run to resume."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from implicit_em.errors import UserError
from implicit_em.files import atomic_write
from implicit_em.run.rundir import RunDir


class UntrustedCheckpointError(UserError):
    """A checkpoint that holds more than tensors and plain data (loading it would run code)."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: tensors and plain Python data only, never code. A file that
    needs more is refused with :class:`UntrustedCheckpointError`; an unreadable one with a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .ckpt file written by scripts/train.py")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is many lines about weights_only whatever the cause; the cause is the "Unsupported ..."
        # or "Trying to load unsupported GLOBAL ..." line, and only a GLOBAL (a callable or class) means code
        causes = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith(("Unsupported", "Trying to load"))]
        what = causes[0] if causes else e.__class__.__name__
        if "GLOBAL" in what:
            raise UntrustedCheckpointError(
                f"{path} holds objects that only running code could rebuild ({what[:120]}); refusing to load it: "
                "use a checkpoint written by scripts/train.py, or re-save this one as tensors and plain data"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint ({what[:120]}); pass another file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable checkpoint ({e.__class__.__name__}); pass another file") from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (fsynced, then renamed over the target) and loads through
    :func:`load_checkpoint` (``weights_only=True`` whatever the caller asks)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f), fsync=True)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location if map_location is not None else "cpu")


def find_last_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint below ``root`` (see :meth:`RunDir.find_last_checkpoint`)."""
    return RunDir.find_last_checkpoint(root)
