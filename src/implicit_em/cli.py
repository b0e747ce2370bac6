"""The command line of ``scripts/train.py``: LightningCLI with the project's sections, defaults and checks.

Configs compose with repeated ``--config configs/<group>/<name>.yaml``; any value overrides with
``--section.key value``. What the command does with the configured objects (fit, evaluate, resume) is
:mod:`implicit_em.app`. Errors in settings print one line and exit with code 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from implicit_em.checkpoints import find_last_checkpoint
from implicit_em.data.memory import ComponentDataModule
from implicit_em.errors import ConfigError, exit_with_argument_error
from implicit_em.eval.report import ReportConfig
from implicit_em.loggers import CSVLogger, WandbLogger
from implicit_em.models import MODELS
from implicit_em.training.callbacks import EpochTimer, FeatureImages, IdentityCheck, ProbeDuringTraining, UsageHistogram
from implicit_em.training.steps import Checkpoint


class SaveAndLogConfig(SaveConfigCallback):
    """Saves the resolved config beside the run (config.yaml) and sends it, flattened, with the model's
    parameter count, to every logger but the CSV one (W&B's run config, TensorBoard's hparams). Notes
    the W&B run id in the run directory, so a resumed run logs to the same W&B run."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        flat = _flatten(self.config.clone().as_dict())
        flat["n_parameters"] = pl_module.n_parameters()
        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger):
                logger.log_hyperparams(flat)
            if isinstance(logger, WandbLogger):  # --ckpt_path last continues this W&B run
                (Path(trainer.log_dir) / "wandb_id").write_text(str(logger.version))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


class OneLineParser(LightningArgumentParser):
    """Argument errors as a single line on stderr, exit code 2 (no usage dump, no traceback)."""

    def error(self, message: str, ex: Exception | None = None):
        exit_with_argument_error(message)


def _loggers(trainer_cfg: Namespace) -> list[Namespace]:
    logger = trainer_cfg.get("logger")
    if isinstance(logger, Namespace):
        return [logger]
    return [lg for lg in logger if isinstance(lg, Namespace)] if isinstance(logger, list) else []


class ImplicitEMCLI(LightningCLI):
    """LightningCLI with the project's defaults, sections and guarantees (see the module docstring)."""

    def __init__(self, args: Sequence[str] | None = None, default_config_files: Sequence[str | Path] | None = None):
        files = [str(p) for p in default_config_files or []]
        super().__init__(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=ComponentDataModule,
            subclass_mode_data=True,
            parser_class=OneLineParser,
            parser_kwargs={
                "default_config_files": files,
                "description": (
                    "Train a model. The models (--model.net NAME, options: --model.net.help NAME): "
                    + ", ".join(f"{c.__name__} ({n})" for n, c in sorted(MODELS.items()))
                    + "; several in one run: --model.help Ensemble. The data: --data.help DigitsDataModule | "
                    "MNISTDataModule | FashionMNISTDataModule | CIFAR10DataModule | CIFAR10PatchesDataModule | "
                    "SyntheticMixtureDataModule | ActivationsDataModule."
                ),
            },
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "callbacks": [EpochTimer(), UsageHistogram()],
                "plugins": {"class_path": "implicit_em.checkpoints.SafeCheckpointIO"},
            },
            auto_configure_optimizers=False,
            run=False,
            args=args,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help="Resume from this checkpoint; 'last' resumes the newest run under --trainer.default_root_dir.",
        )  # fmt: skip
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.save_last": "link", "checkpoint.save_top_k": 1, "checkpoint.every_n_epochs": 1}
        )
        parser.add_lightning_class_args(FeatureImages, "features")
        parser.add_lightning_class_args(ProbeDuringTraining, "probe")
        parser.add_lightning_class_args(IdentityCheck, "identity")
        parser.add_class_arguments(ReportConfig, "report")
        parser.link_arguments("data.dims", "model.init_args.in_features", apply_on="instantiate")
        parser.link_arguments("seed_everything", "model.init_args.seed", compute_fn=_seed)
        parser.link_arguments("seed_everything", "data.init_args.shuffle_seed", compute_fn=_seed)

    # -- before anything is built ---------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        cfg = self.config
        root = cfg.trainer.default_root_dir or "."
        self._check_devices(cfg)
        if cfg.ckpt_path == "last":
            self._resume_last(cfg, root)
        if cfg.trainer.enable_progress_bar is not False:
            callbacks = cfg.trainer.callbacks or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            if not any("ProgressBar" in getattr(c, "class_path", "") for c in callbacks):
                cfg.trainer.callbacks = [*callbacks, Namespace(class_path="implicit_em.training.callbacks.ProgressBar",
                                                                init_args=Namespace(refresh_rate=10))]  # fmt: skip
        for lg in _loggers(cfg.trainer):
            if "save_dir" in lg.init_args and lg.init_args.save_dir in (None, "."):
                lg.init_args.save_dir = str(root)
        self._share_version(cfg)

    @staticmethod
    def _share_version(cfg: Namespace) -> None:
        """Give the file loggers (CSV, TensorBoard) one run directory: the next free version_N under their
        name. DDP's worker processes inherit the choice through the environment instead of recounting."""
        dir_loggers = [lg for lg in _loggers(cfg.trainer) if "version" in lg.init_args and "save_dir" in lg.init_args]
        if not dir_loggers or any(lg.init_args.version is not None for lg in dir_loggers):
            return
        inherited = os.environ.get("LOCAL_RANK", "0") != "0"  # a worker launched by rank 0
        version = os.environ.get("IEM_RUN_VERSION") if inherited else None
        if version is None:
            first = dir_loggers[0].init_args
            taken = [p.name for p in (Path(first.save_dir) / first.name).glob("version_*")]
            numbers = [int(n.split("_")[1]) for n in taken if n.split("_")[1].isdigit()]
            version = os.environ["IEM_RUN_VERSION"] = f"version_{max(numbers, default=-1) + 1}"
        for lg in dir_loggers:
            lg.init_args.version = version

    @staticmethod
    def _check_devices(cfg: Namespace) -> None:
        devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes or 1
        if isinstance(devices, str) and devices.isdigit():
            devices = int(devices)
        if isinstance(devices, int) and devices > 0:
            world = devices * nodes
            batch = cfg.data.init_args.batch_size
            if batch % world:
                raise ConfigError(
                    f"data.batch_size {batch} must divide evenly across {world} devices (it is the global batch)"
                )

    @staticmethod
    def _resume_last(cfg: Namespace, root: str) -> None:
        ckpt = find_last_checkpoint(root)
        if ckpt is None:
            print(f"--ckpt_path last: no last.ckpt under {Path(root).resolve()}; starting a new run", file=sys.stderr)
            cfg.ckpt_path = None
            return
        cfg.ckpt_path = str(ckpt)
        run = ckpt.parent.parent  # <root>/<name>/<version>/checkpoints/last.ckpt
        for lg in _loggers(cfg.trainer):
            args = lg.init_args
            if "version" in args and "name" in args:
                args.name, args.version = run.parent.name, run.name
            elif lg.class_path.endswith("WandbLogger") and (run / "wandb_id").is_file():
                args.id, args.resume = (run / "wandb_id").read_text().strip(), "allow"



def _seed(seed_everything) -> int:
    """The model's seed and the data order from ``--seed_everything`` (an integer, or true/false: 0)."""
    return 0 if isinstance(seed_everything, bool) or seed_everything is None else int(seed_everything)


