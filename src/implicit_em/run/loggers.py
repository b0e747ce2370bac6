"""The run's loggers: Lightning's CSV and TensorBoard loggers writing into the run directory, and W&B that never
hangs or fails a run."""

from __future__ import annotations

import csv
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from implicit_em.run.rundir import RunDir

WANDB_HOST = ("api.wandb.ai", 443)


class RunMetricsCSV:
    """metrics.csv of one run, written by appending: rows are never deleted, except once on a resume, those of
    steps at or after the step it resumes from (logged after the last checkpoint, they are trained again), so a
    resumed run keeps its whole history with each step once. Also hparams.yaml, as Lightning's writer."""

    def __init__(self, log_dir: str | Path, resume_step: int | None = None):
        self.path = RunDir(log_dir).metrics_csv_path
        self.log_dir = str(log_dir)
        self.rows: list[dict] = []
        self.keys: list[str] = []
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.keys = list(reader.fieldnames or [])
                kept = [r for r in reader if resume_step is None or _step(r) < resume_step]
            self._write(kept, mode="w")

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        row = {k: float(v) if hasattr(v, "item") else v for k, v in metrics_dict.items()}
        self.rows.append({**row, "step": step} if step is not None else row)

    def log_hparams(self, params: dict[str, Any]) -> None:
        import yaml

        from implicit_em.files import atomic_write

        text = yaml.safe_dump({k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                               for k, v in params.items()})  # fmt: skip
        atomic_write(Path(self.log_dir) / "hparams.yaml", lambda f: f.write(text.encode()))

    def save(self) -> None:
        if not self.rows:
            return
        new = sorted(set().union(*self.rows) - set(self.keys))
        if new and self.path.is_file():  # a new column: the file is rewritten once with the wider header
            with open(self.path, newline="") as f:
                old = list(csv.DictReader(f))
            self.keys = sorted({*self.keys, *new})
            self._write(old, mode="w")
        self.keys = sorted({*self.keys, *new})
        self._write(self.rows, mode="a")
        self.rows = []

    def _write(self, rows: list[dict], mode: str) -> None:
        fresh = mode == "w" or not self.path.is_file()
        with open(self.path, "w" if fresh else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.keys)
            if fresh:
                writer.writeheader()
            writer.writerows(rows)


def _step(row: dict) -> int:
    try:
        return int(float(row.get("step") or 0))
    except ValueError:
        return 0


class CSVLogger(_CSVLogger):
    """Lightning's CSV logger writing the run's ``metrics.csv`` through :class:`RunMetricsCSV` (a resumed run keeps
    its history); ``save_dir`` defaults to the root directory.

    Args:
        resume_step: the global step of the checkpoint the run resumes from; a resume sets it through
            :meth:`resume_from` (config.yaml never holds it).
        (the others: Lightning's CSVLogger's)
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str = "implicit_em",
        version: int | str | None = None,
        resume_step: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(save_dir or ".", name=name, version=version, **kwargs)
        self.resume_step = resume_step
        self.writer: RunMetricsCSV | None = None

    def resume_from(self, step: int) -> None:
        """Go on from the checkpoint at global ``step``: metrics.csv keeps the rows before it (before any row is
        written)."""
        self.resume_step = step

    @property
    @rank_zero_experiment
    def experiment(self) -> RunMetricsCSV:
        if self.writer is None:
            self.writer = RunMetricsCSV(self.log_dir, self.resume_step)
        return self.writer


class TensorBoardLogger(_TensorBoardLogger):
    """Lightning's TensorBoard logger; ``save_dir`` defaults to the root directory."""

    def __init__(
        self, save_dir: str | None = None, name: str = "implicit_em", version: int | str | None = None, **kwargs: Any
    ):
        super().__init__(save_dir or ".", name=name, version=version, **kwargs)

    def resume_from(self, step: int) -> None:
        """Go on from the checkpoint at global ``step``: events at or after it are purged (SummaryWriter's
        ``purge_step``) when the writer opens."""
        self._kwargs["purge_step"] = step


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


def wandb_mode() -> str:
    """The mode a standalone W&B run opens in: ``WANDB_MODE`` when it is offline or disabled, else online with an
    API key and a connection, else offline (its files stay for a later ``wandb sync``)."""
    mode = os.environ.get("WANDB_MODE")
    if mode in ("offline", "disabled"):
        return mode
    return "online" if wandb_api_key_available() and reachable() else "offline"


def open_wandb_run(project: str, folder: str | Path, job_type: str, name: str, config: dict):
    """A new standalone W&B run under ``folder`` (not a training run's logger), offline by itself
    (:func:`wandb_mode`), never waiting more than 30 s to start."""
    import wandb

    return wandb.init(project=project, dir=str(folder), mode=wandb_mode(), job_type=job_type, name=name,
                      config=config, settings=wandb.Settings(init_timeout=30, silent=True))  # fmt: skip


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
