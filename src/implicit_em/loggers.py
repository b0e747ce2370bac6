"""The run's loggers: Lightning's CSV and TensorBoard loggers writing into the run directory, and W&B that never
hangs or fails a run."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger

WANDB_HOST = ("api.wandb.ai", 443)


class CSVLogger(_CSVLogger):
    """Lightning's CSV logger (per-epoch ``metrics.csv``); ``save_dir`` defaults to the root directory."""

    def __init__(
        self, save_dir: str | None = None, name: str = "implicit_em", version: int | str | None = None, **kwargs: Any
    ):
        super().__init__(save_dir or ".", name=name, version=version, **kwargs)


class TensorBoardLogger(_TensorBoardLogger):
    """Lightning's TensorBoard logger; ``save_dir`` defaults to the root directory."""

    def __init__(
        self, save_dir: str | None = None, name: str = "implicit_em", version: int | str | None = None, **kwargs: Any
    ):
        super().__init__(save_dir or ".", name=name, version=version, **kwargs)


def wandb_api_key_available() -> bool:
    """An API key in the environment or in ~/.netrc (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def reachable(host: tuple[str, int] = WANDB_HOST, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included)."""
    result = []

    def attempt():
        try:
            socket.create_connection(host, timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result)


class WandbLogger(_WandbLogger):
    """Lightning's W&B logger, offline by itself when there is no API key or no connection.

    Offline runs keep their files under ``<save_dir>/wandb/offline-run-*`` for a later ``wandb sync``.
    ``save_dir`` defaults to ``--trainer.default_root_dir``. All arguments are those of Lightning's
    ``WandbLogger`` (project, name, group, tags, ...).
    """

    def __init__(self, *args: Any, offline: bool = False, **kwargs: Any):
        if not offline and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
            why = (
                "no API key" if not wandb_api_key_available() else "api.wandb.ai unreachable" if not reachable() else ""
            )
            if why:
                offline = True
                print(
                    f"W&B: {why}; logging offline (upload later with `wandb sync <run dir>/wandb/offline-run-*`)",
                    file=sys.stderr,
                )
        kwargs.setdefault("settings", None)
        if kwargs["settings"] is None:
            import wandb

            kwargs["settings"] = wandb.Settings(init_timeout=30, silent=True)
        super().__init__(*args, offline=offline, **kwargs)

    def set_save_dir(self, save_dir: str) -> None:
        """Point the run's files at ``save_dir`` (only before the run starts)."""
        self._save_dir = save_dir
        self._wandb_init["dir"] = save_dir
        Path(save_dir).mkdir(parents=True, exist_ok=True)
