"""The command line of ``scripts/train.py``: LightningCLI with the project's sections, defaults and checks.

Configs compose with repeated ``--config configs/<group>/<name>.yaml``; any value overrides with
``--section.key value``. What the command does with the configured objects (fit, evaluate, resume) is
:mod:`implicit_em.run.app`. Errors in settings print one line and exit with code 2, before anything is built and
with nothing printed ahead of them (no LightningCLI warning about its ``args``, no "Seed set to").

A resume (``--ckpt_path``) starts from the run's own config.yaml: every setting of the run comes back, the Trainer's
(epochs, steps, loggers) included, and the command's arguments override any of them. config.yaml records the run's
settings only; how a process resumed it (the checkpoint, the step its logs go on from) is passed to the loggers
without being saved. A resume that changes no setting leaves config.yaml byte for byte; one that changes a setting
(``--trainer.max_epochs 200`` to train on) saves the new settings, so config.yaml always rebuilds the run as its
last process trained it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar as AnyProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from implicit_em.data.memory import ComponentDataModule
from implicit_em.errors import ConfigError, exit_with_argument_error
from implicit_em.models import MODELS
from implicit_em.run.checkpoints import find_last_checkpoint
from implicit_em.run.loggers import CSVLogger, WandbLogger
from implicit_em.run.report import ReportConfig, is_causal_harvest
from implicit_em.run.rundir import WANDB_ID, RunDir
from implicit_em.training.callbacks import (
    ComponentImages,
    EpochTimer,
    IdentityCheck,
    ProbeDuringTraining,
    ProgressBar,
    UsageHistogram,
)
from implicit_em.training.steps import Checkpoint


class SaveAndLogConfig(SaveConfigCallback):
    """Saves the run's settings beside it (config.yaml: the resolved config without ``ckpt_path``, which says how
    this process started, not what the run is) and sends them, flattened, with the model's parameter count, to
    every logger but the CSV one (W&B's run config, TensorBoard's hparams). Notes the W&B run id in the run
    directory, so a resumed run logs to the same W&B run. A config.yaml that already holds these settings (a
    resume that changes nothing) is left as it is, byte for byte."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        self.config = self.config.clone()
        self.config.ckpt_path = None
        run = RunDir.of_trainer(trainer)  # every rank: log_dir may broadcast
        if trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            if not run.holds_config(text):  # the dump written as it is: one dump per run, not two
                run.path.mkdir(parents=True, exist_ok=True)
                run.config_path.write_text(text)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        flat = _flatten(self.config.clone().as_dict())
        flat["n_parameters"] = pl_module.n_parameters()
        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger):
                logger.log_hyperparams(flat)
            if isinstance(logger, WandbLogger):  # --ckpt_path last continues this W&B run
                (RunDir.of_trainer(trainer) / WANDB_ID).write_text(str(logger.version))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


class ReadableHelp(DefaultHelpFormatter):
    """jsonargparse's help, with the functions in a default (``--model``'s optimiser) named by their import path
    instead of ``<function adam at 0x7f...>``."""

    def _expand_help(self, action) -> str:
        import re

        return re.sub(r"<function (\w+) at 0x[0-9a-f]+>", lambda m: _import_path(m[1]), super()._expand_help(action))


def _import_path(name: str) -> str:
    """``module.name`` of the project's module-level function ``name`` (its bare name when none has it)."""
    for module_name, module in sorted(sys.modules.items()):
        if module_name.startswith("implicit_em.") and callable(getattr(module, name, None)):
            if getattr(getattr(module, name), "__module__", None) == module_name:
                return f"{module_name}.{name}"
    return name


class OneLineParser(LightningArgumentParser):
    """Argument errors as a single line on stderr, exit code 2 (no usage dump, no traceback); readable help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", ReadableHelp)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        exit_with_argument_error(message)


def loggers_of(trainer_cfg: Namespace) -> list[Namespace]:
    """The logger sections of a parsed ``trainer`` section (none, one or a list)."""
    logger = trainer_cfg.get("logger")
    if isinstance(logger, Namespace):
        return [logger]
    return [lg for lg in logger if isinstance(lg, Namespace)] if isinstance(logger, list) else []


def is_file_logger(logger: Namespace) -> bool:
    """A logger whose files make the run directory (CSV, TensorBoard): its name and version are the run's."""
    return logger.class_path.endswith(("CSVLogger", "TensorBoardLogger"))


def option(args: list[str], name: str) -> str | None:
    """The last value of ``--name VALUE`` or ``--name=VALUE`` among raw command-line ``args``."""
    found = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(name + "="):
            found = arg.split("=", 1)[1]
    return found


def with_the_runs_config(args: list[str], default_config_files: list[str]) -> list[str]:
    """A resume (``--ckpt_path last`` or a checkpoint's path) starts from the run's saved config.yaml: every setting
    of the run (model, data, seed, the Trainer's: epochs, steps, loggers) comes back without retyping it, and the
    command's own arguments, which follow it, override any of them."""
    import yaml

    ckpt = option(args, "--ckpt_path")
    if ckpt in (None, "null", "None"):
        return args
    if ckpt == "last":
        root = option(args, "--trainer.default_root_dir")
        configs = [*default_config_files, *(args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config")]
        for config in configs if root is None else []:  # the last config that names a root directory wins
            if Path(config).is_file():
                trainer = (yaml.safe_load(Path(config).read_text()) or {}).get("trainer") or {}
                root = trainer.get("default_root_dir", root)
        found = find_last_checkpoint(root or ".")
        if found is None:
            return args
        ckpt = str(found)
    config = RunDir.of_checkpoint(ckpt).config_path
    if not config.is_file():
        return args
    return [*saved_config_args(config), *args]


#: sections of config.yaml renamed since a run may have saved it: old name -> new name
RENAMED_SECTIONS = {"features": "components"}


def saved_config_args(config: str | Path) -> list[str]:
    """``--config`` arguments that load a run's saved config.yaml: the file itself, or, when it was saved under
    section names since renamed (:data:`RENAMED_SECTIONS`), its text with the current names."""
    import yaml

    saved = yaml.safe_load(Path(config).read_text()) or {}
    if not any(old in saved for old in RENAMED_SECTIONS):
        return ["--config", str(config)]
    renamed = {RENAMED_SECTIONS.get(k, k): v for k, v in saved.items()}
    return ["--config", yaml.safe_dump(renamed, sort_keys=False)]


class ImplicitEMCLI(LightningCLI):
    """LightningCLI with the project's defaults, sections and guarantees (see the module docstring)."""

    def __init__(self, args: Sequence[str] | None = None, default_config_files: Sequence[str | Path] | None = None):
        files = [str(p) for p in default_config_files or []]
        args = with_the_runs_config(list(sys.argv[1:] if args is None else args), files)
        self.resume_step: int | None = None
        with quiet_setup():
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
                    "plugins": {"class_path": "implicit_em.run.checkpoints.SafeCheckpointIO"},
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
        parser.add_argument(
            "--threads", type=int | None, default=None,
            help="CPU threads for this run, torch's and numpy's BLAS (null: their default, one per core). On a "
            "shared or busy machine set it to the cores you may use: oversubscribed threads make each step many "
            "times slower.",
        )  # fmt: skip
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.save_last": "link", "checkpoint.save_top_k": 1, "checkpoint.every_n_epochs": 1}
        )
        parser.add_lightning_class_args(ComponentImages, "components")
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
        check_trainer_counts(cfg.trainer)
        self._check_devices(cfg)
        self._check_harvest_files(cfg)
        self.resume_state = None
        if cfg.ckpt_path is not None:
            self._resume(cfg, root)
        if self.resume_state is None:
            self._new_wandb_ids(cfg)
        callbacks = cfg.trainer.callbacks or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if cfg.trainer.enable_progress_bar is False:  # a config saved by an earlier version may name one
            cfg.trainer.callbacks = [c for c in callbacks if "ProgressBar" not in getattr(c, "class_path", "")]
        for lg in loggers_of(cfg.trainer):
            if "save_dir" in lg.init_args and lg.init_args.save_dir in (None, "."):
                lg.init_args.save_dir = str(root)
        self._share_version(cfg)

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with the project's progress bar unless ``--trainer.enable_progress_bar false``; a setting
        Lightning refuses is a one-line :class:`ConfigError`; a resumed run's loggers go on from the checkpoint's
        step (:meth:`_resume`)."""
        callbacks = self.config_init.trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if self.config_init.trainer.get("enable_progress_bar") is not False and not any(
            isinstance(c, AnyProgressBar) for c in callbacks
        ):  # the project's bar, added here rather than to the config: config.yaml holds the run's settings only
            kwargs.setdefault("callbacks", [*callbacks, ProgressBar(refresh_rate=10)])
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as e:
            raise ConfigError(f"trainer: {' '.join(str(e).split())}") from None
        for logger in trainer.loggers if self.resume_step is not None else []:
            if hasattr(logger, "resume_from"):
                logger.resume_from(self.resume_step)
        return trainer

    @staticmethod
    def _check_harvest_files(cfg: Namespace) -> None:
        """A causal LM's harvest whose end-of-run evaluation (CE loss recovered, ``report.lm_windows``) would need
        token files it lacks is refused now, not after training."""
        root = (cfg.data.get("init_args") or Namespace()).get("root")
        windows, tokens = cfg.report.get("lm_windows"), cfg.report.get("lm_tokens")
        splices = bool(windows) if windows is not None else bool(tokens)
        if not root or not splices or not is_causal_harvest(root):
            return
        from implicit_em.lm.causal_lm import check_splice_files

        check_splice_files(root)

    @staticmethod
    def _share_version(cfg: Namespace) -> None:
        """Give the file loggers (CSV, TensorBoard) one run directory: the next free version_N under their
        name. DDP's worker processes inherit the choice through the environment instead of recounting."""
        dir_loggers = [lg for lg in loggers_of(cfg.trainer) if is_file_logger(lg)]
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

    def _resume(self, cfg: Namespace, root: str) -> None:
        """Point the run at the checkpoint to resume (``last``: the newest under ``root``) and load it safely now,
        before any file of the run is written: a checkpoint that carries code or does not read is refused here.
        Its loggers continue the run's own files: the CSV and TensorBoard history before the checkpoint's step
        is kept (later rows, from after the last checkpoint, are trained again), W&B continues its run id. The step
        is bookkeeping, not a setting: the loggers get it once built (:meth:`instantiate_trainer`), config.yaml never
        holds it."""
        from implicit_em.run.checkpoints import load_checkpoint

        ckpt = find_last_checkpoint(root) if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
        if ckpt is None:
            print(f"--ckpt_path last: no last.ckpt under {Path(root).resolve()}; starting a new run", file=sys.stderr)
            cfg.ckpt_path = None
            return
        self.resume_state = load_checkpoint(ckpt)
        cfg.ckpt_path = str(ckpt)
        self.resume_step = int(self.resume_state.get("global_step") or 0)
        run = RunDir.of(ckpt)[0]  # <root>/<name>/<version>/checkpoints/last.ckpt
        where = run.path.parent.parent
        for lg in loggers_of(cfg.trainer):
            args = lg.init_args
            if args.get("save_dir") is not None and Path(args.save_dir).resolve() != where:
                args.save_dir = str(where)  # a run moved or copied since its config was saved goes on where it is
            if is_file_logger(lg):
                args.name, args.version = run.path.parent.name, run.path.name
            if lg.class_path.endswith("CSVLogger") and args.get("resume_step") is not None:
                args.resume_step = None  # an earlier version saved it in config.yaml
            elif lg.class_path.endswith("WandbLogger") and (run / WANDB_ID).is_file():
                args.id = (run / WANDB_ID).read_text().strip()

    @staticmethod
    def _new_wandb_ids(cfg: Namespace) -> None:
        """A new run's W&B loggers get an id of their own (never another run's), kept in the run folder."""
        import secrets

        for lg in loggers_of(cfg.trainer):
            if lg.class_path.endswith("WandbLogger") and not lg.init_args.get("id"):
                lg.init_args.id = secrets.token_hex(6)


@contextlib.contextmanager
def quiet_setup() -> Iterator[None]:
    """While the CLI parses and builds: no LightningCLI warning about being given ``args`` (the project always
    passes them: the run's own config comes first on a resume) and no "Seed set to N" line (the seed is in
    config.yaml and metrics.json), so a refused run prints its one error line alone."""
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            yield
    finally:
        seed_log.setLevel(level)


#: the Trainer's counts: key -> (smallest allowed value, what it means)
TRAINER_COUNTS = {
    "max_epochs": (-1, "an integer >= -1 (-1: no limit) or null"),
    "min_epochs": (0, "an integer >= 0 or null"),
    "max_steps": (-1, "an integer >= -1 (-1: no limit)"),
    "min_steps": (0, "an integer >= 0 or null"),
    "check_val_every_n_epoch": (1, "an integer >= 1 or null"),
    "accumulate_grad_batches": (1, "an integer >= 1"),
    "num_nodes": (1, "an integer >= 1"),
    "log_every_n_steps": (0, "an integer >= 0 or null"),
    "num_sanity_val_steps": (-1, "an integer >= -1 (-1: the whole validation split) or null"),
}


def check_trainer_counts(trainer: Namespace) -> None:
    """Refuse, before the Trainer is built, a count of its own (epochs, steps, ...) below what it allows."""
    for key, (low, allowed) in TRAINER_COUNTS.items():
        value = trainer.get(key)
        if value is not None and not (isinstance(value, int) and value >= low):
            raise ConfigError(f"trainer.{key} must be {allowed} (got {value!r})")


def _seed(seed_everything) -> int:
    """The model's seed and the data order from ``--seed_everything`` (an integer, or true/false: 0)."""
    return 0 if isinstance(seed_everything, bool) or seed_everything is None else int(seed_everything)
