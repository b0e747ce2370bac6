"""The run directory: the one object that knows a run's layout (every file name of a run is spelt here only).

    <root>/<name>/version_N/          (Lightning's CSV logger's folder; scripts/train.py prints its metrics.json)
        config.yaml                   the resolved config (LightningCLI's), what rebuilds the run
        checkpoints/*.ckpt            last.ckpt links to the newest
        metrics.csv                   per-epoch training and validation numbers
        metrics.json                  the end-of-run evaluation
        readout.safetensors           the ridge readout x ~ f R + c (normalised space) the evaluation fitted
        component_density.png           log10 firing frequency of every component
        components.png, components/   the component images (image data)
        wandb_id                      the W&B run id, so a resumed run continues its own W&B run

Everything else asks this object for a path (:func:`implicit_em.run.app.rebuild` rebuilds a run's model and data
from it). This module imports nothing of the project but :mod:`implicit_em.errors` and :mod:`implicit_em.files`, so
every layer may ask it for a path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from implicit_em.errors import DataError

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LAST_CKPT = "last.ckpt"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
READOUT = "readout.safetensors"
DENSITY_PNG = "component_density.png"
COMPONENTS_PNG = "components.png"
COMPONENTS_DIR = "components"
WANDB_ID = "wandb_id"


def _in_run(name: str) -> property:
    return property(lambda run: run.path / name, doc=f"``{name}`` in the run directory")


@dataclass(frozen=True)
class RunDir:
    """A run directory (see the module docstring); ``path`` need not exist yet while a run is being set up."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    # -- finding runs ----------------------------------------------------------------------------------
    @classmethod
    def of(cls, path: str | Path) -> tuple[RunDir, Path]:
        """(run, checkpoint) of a run directory (its newest checkpoint) or of a checkpoint file inside one."""
        path = Path(path)
        if path.is_file():
            return cls.of_checkpoint(path), path
        if not path.is_dir():
            raise DataError(f"{path} does not exist; pass a run directory (with checkpoints/) or a .ckpt file")
        run = cls(path)
        return run, run.last_checkpoint()

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run a checkpoint file belongs to (``<run>/checkpoints/<name>.ckpt``)."""
        return cls(Path(checkpoint).resolve().parent.parent)

    @staticmethod
    def find_last_checkpoint(root: str | Path) -> Path | None:
        """The newest checkpoint below ``root`` (the run to resume), or None: ``last.ckpt`` links to it; a
        run killed between writing a checkpoint and relinking ``last.ckpt`` is still found."""
        found = [p for p in Path(root).glob(f"**/{CHECKPOINTS}/*.ckpt") if p.is_file()]
        if not found:
            return None
        newest = max(found, key=lambda p: (p.stat().st_mtime, p.name.startswith("last")))
        last = newest.parent / LAST_CKPT
        return last if last.is_file() and last.resolve() == newest.resolve() else newest

    @classmethod
    def of_trainer(cls, trainer) -> RunDir:
        """The run directory of a Trainer: its log directory (every rank: ``log_dir`` may broadcast)."""
        return cls(Path(trainer.log_dir or trainer.default_root_dir))

    # -- paths ---------------------------------------------------------------------------------------
    def __truediv__(self, name: str) -> Path:
        return self.path / name

    config_path = _in_run(CONFIG)
    metrics_path = _in_run(METRICS_JSON)
    metrics_csv_path = _in_run(METRICS_CSV)
    readout_path = _in_run(READOUT)
    checkpoint_dir = _in_run(CHECKPOINTS)

    def last_checkpoint(self) -> Path:
        """``checkpoints/last.ckpt``, else the newest checkpoint; a run without one is refused with one line."""
        last = self.checkpoint_dir / LAST_CKPT
        found = (
            [last] if last.is_file() else sorted(self.checkpoint_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        )
        if not found:
            raise DataError(f"{self.path} holds no checkpoints/*.ckpt; pass the run directory scripts/train.py printed")
        return found[-1]

    def remove_if_empty(self) -> None:
        """Remove the run directory (and its name folder, if that is then empty) when it holds no file: what a
        new run that failed before writing anything leaves behind."""
        if not self.path.is_dir() or any(p.is_file() for p in self.path.rglob("*")):
            return
        import shutil

        shutil.rmtree(self.path)
        if self.path.parent.is_dir() and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()

    # -- contents ------------------------------------------------------------------------------------
    def holds_config(self, text: str) -> bool:
        """Whether config.yaml exists and holds the settings of ``text`` (a YAML dump; comments aside)."""
        import yaml

        if not self.config_path.is_file():
            return False
        try:
            return yaml.safe_load(self.config_path.read_text()) == yaml.safe_load(text)
        except yaml.YAMLError:
            return False

    def require_config(self, given: str | Path | None = None) -> None:
        """Refuse, with one line, a run without config.yaml, naming what is wrong with the path the user ``given``:
        a checkpoint outside a run's checkpoints/ folder, or a folder that is not a run directory."""
        if self.config_path.is_file():
            return
        given = Path(given) if given is not None else self.path
        if given.is_file() and given.parent.name != CHECKPOINTS:
            raise DataError(
                f"{given} is a checkpoint outside a run directory (<run>/{CHECKPOINTS}/*.ckpt, with {CONFIG} in <run>); "
                "pass the run directory scripts/train.py printed, or a checkpoint inside it"
            )
        raise DataError(f"{self.path} has no {CONFIG}; pass the run directory that scripts/train.py wrote")

    def config(self) -> dict[str, Any]:
        """The resolved config (config.yaml) as plain data."""
        import yaml

        if not self.config_path.is_file():
            raise DataError(f"no {CONFIG} in {self.path}; pass the run directory scripts/train.py printed")
        return yaml.safe_load(self.config_path.read_text()) or {}

    def metrics(self) -> dict[str, Any]:
        """metrics.json, or {} before the run has been evaluated."""
        return json.loads(self.metrics_path.read_text()) if self.metrics_path.is_file() else {}

    def net_class(self):
        """The registered net class of the run's model, from its config (never guessed from weight names)."""
        from implicit_em.models import model_class

        model = self.config().get("model") or {}
        args = model.get("init_args") or {}
        if str(model.get("class_path", "")).endswith("Ensemble"):
            return model_class(str(args.get("member_class", "implicit_em")))
        net = args.get("net") or {}
        return model_class(str(net.get("class_path", "") if isinstance(net, dict) else net))

    def data_root(self) -> Path | None:
        root = ((self.config().get("data") or {}).get("init_args") or {}).get("root")
        return Path(root) if root else None

    def manifest(self) -> dict[str, Any] | None:
        """The data root's manifest.json (what scripts/harvest.py wrote), when there is one."""
        root = self.data_root()
        if root is None or not (root / "manifest.json").is_file():
            return None
        try:
            return json.loads((root / "manifest.json").read_text())
        except (OSError, ValueError):
            return None

    def save_readout(self, readout_state: dict) -> Path:
        """Write ``readout.safetensors`` (``R`` K x D, ``c`` D, normalised space), atomically."""
        from safetensors.torch import save

        from implicit_em.files import atomic_write

        blob = save({k: v.float().contiguous().cpu() for k, v in readout_state.items()})
        return atomic_write(self.readout_path, lambda f: f.write(blob))

    def readout(self) -> dict:
        """The saved readout ``{"R", "c"}``; a missing or unreadable file is refused with one line."""
        from implicit_em.files import read_safetensors

        if not self.readout_path.is_file():
            raise DataError(
                f"{self.readout_path} is missing: the end-of-run evaluation saves it; re-evaluate the run with "
                "scripts/probe.py"
            )
        readout = read_safetensors(self.readout_path)
        if "R" not in readout or "c" not in readout:
            raise DataError(f"{self.readout_path} lacks R or c; re-evaluate the run to re-create it")
        return readout
