"""The command line of ``scripts/sweep.py``: an Optuna study over train.py's settings (see docs/sweep.md).

    python scripts/sweep.py --space FILE.yaml --study NAME --trials N --root DIR [--storage URL] [--workers W]
        [--sampler tpe|random|grid] [--metric KEY] [--direction maximize|minimize] [--pruner median|none]
        -- <scripts/train.py options shared by every trial>

Settings a user can fix (a malformed space file, an option train.py refuses, a storage that does not open) are
one line on stderr and exit code 2, before any trial runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from implicit_em.errors import ConfigError, OneLineArgumentParser, report_user_error

#: metric names whose larger values are better, and smaller
MAXIMIZED = ("accuracy", "recovered", "explained", "cosine", "nmi", "ari")
MINIMIZED = ("fvu", "loss", "mse", "kl", "dead")


def parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="sweep.py",
        description="Search train.py's settings with Optuna: every trial an ordinary run of scripts/train.py "
        "under --root, scored on the validation split. Options after `--` go to every trial's train.py.",
    )
    p.add_argument("--space", required=True, help="YAML file: params: {<train.py key>: {type: float|int|"
                   "categorical, low, high, log, step, choices}} (see docs/sweep.md)")  # fmt: skip
    p.add_argument("--study", required=True, help="the study's name (the same name and storage join it)")
    p.add_argument("--trials", type=int, required=True, help="COMPLETE trials the study should hold")
    p.add_argument("--root", required=True, help="folder of the trials' run directories (<root>/<study>/trial_NNNN)")
    p.add_argument(
        "--storage",
        help="where the study lives: sqlite:///FILE.db (default: sqlite:///<root>/<study>.db; one machine), "
        "a database URL such as postgresql+psycopg2://user:password@host/db (several machines), or Optuna's "
        "journal file journal:PATH (or a PATH ending in .log) on a filesystem all machines share",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine, the cores split "
                   "between them (default 1)")  # fmt: skip
    p.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe",
                   help="tpe (default), random, or grid (every combination of discrete values)")  # fmt: skip
    p.add_argument("--metric", help="the metrics.json number to optimise (default: the space file's metric, "
                   "else val_probe_accuracy, or val_fvu for activations)")  # fmt: skip
    p.add_argument("--direction", choices=("maximize", "minimize"),
                   help="default: the space file's, else from the metric's name")  # fmt: skip
    p.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="median (default): stop a trial whose validation number after an epoch is below the "
                   "median of earlier trials at that epoch; none")  # fmt: skip
    p.add_argument("--seed", type=int, help="the sampler's seed (worker i: seed + i)")
    p.add_argument("--heartbeat", type=int, default=10, help="seconds between a running trial's heartbeats; a "
                   "trial silent for 6 of them (its worker killed) is marked FAIL (default 10)")  # fmt: skip
    p.add_argument("--wandb-project", default="implicit-em", help="W&B project of the trials' runs, grouped by "
                   "study (offline without a key or connection)")  # fmt: skip
    p.add_argument("--no-wandb", action="store_true", help="no W&B runs")
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--default-config", action="append", default=[], help=argparse.SUPPRESS)  # train.py's, for workers
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the sweep's options, train.py's options after ``--``)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def direction_of(metric: str) -> str:
    """maximize or minimize from a metric's name (accuracy, recovered, ... / fvu, loss, ...)."""
    name = metric.lower()
    if any(w in name for w in MAXIMIZED):  # first: ce_loss_recovered is a loss recovered
        return "maximize"
    if any(w in name for w in MINIMIZED):
        return "minimize"
    raise ConfigError(f"--metric {metric}: cannot tell whether larger is better; pass --direction")


def main(argv: Sequence[str] | None = None, default_config_files: Sequence[str | Path] | None = None) -> int:
    """Run the sweep (or, with the hidden ``--worker-index``, one of its workers). Returns the exit code."""
    own, train = split_argv(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(own)
    try:
        defaults = args.default_config or [str(Path(p).resolve()) for p in default_config_files or []]
        return sweep(args, own, train, defaults)
    except Exception as e:
        return report_user_error(e)


def sweep(args: argparse.Namespace, own: list[str], train: list[str], default_config_files: list[str]) -> int:
    from implicit_em.sweep.space import load_space

    space = load_space(args.space)  # a malformed file stops here, before anything heavy is imported
    for name, value, least in (("--trials", args.trials, 1), ("--workers", args.workers, 1),
                               ("--heartbeat", args.heartbeat, 1)):  # fmt: skip
        if value < least:
            raise ConfigError(f"{name} must be an integer >= {least} (got {value})")
    try:
        import optuna
    except ModuleNotFoundError:
        raise ConfigError("sweeps need Optuna: pip install 'implicit-em[sweep]'") from None
    from implicit_em.sweep import storage as storages
    from implicit_em.sweep import study as studies
    from implicit_em.sweep import summary
    from implicit_em.sweep.trial import TrialPlan, option, parse_only

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    worker = args.worker_index is not None
    threads = None if option(train, "--threads") else max(1, studies.cores() // args.workers)
    wandb_project = None if args.no_wandb else args.wandb_project
    plan = TrialPlan(args.study, Path(args.root), train, default_config_files, "", threads, wandb_project,
                     prune=args.pruner != "none")  # fmt: skip

    metric = args.metric or space.metric
    if not worker:  # every option train.py would refuse, refused now (and the data, for the default metric)
        config = parse_only(plan, space.first())
        activations = str(config.data.class_path).endswith("ActivationsDataModule")
        metric = metric or ("val_fvu" if activations else "val_probe_accuracy")
    plan.metric = metric or "val_probe_accuracy"
    direction = args.direction or space.direction or direction_of(plan.metric)
    if args.sampler == "grid" and args.trials > space.grid_size():
        raise ConfigError(f"--trials {args.trials}: the grid has {space.grid_size()} points; ask for at most that")
    url = storages.normalize(args.storage or storages.default_storage(args.root, args.study))
    storage = storages.open_storage(url, args.heartbeat)
    seed = None if args.seed is None else args.seed + (args.worker_index or 0)
    study = studies.open_study(
        args.study,
        storage,
        direction,
        plan.metric,
        studies.make_sampler(args.sampler, space, seed),
        studies.make_pruner(args.pruner),
    )
    if not worker:
        summary.say(f"study {args.study} on {storages.masked(url)}: {plan.metric} ({direction}), {args.trials} "
                    f"COMPLETE trials, {args.workers} worker(s) x {threads or 'the given'} thread(s); runs in "
                    f"{plan.root / args.study}")  # fmt: skip
    run = studies.Worker(study, plan, space, args.trials, summary.say, min(2.0, args.heartbeat)).run
    if worker or args.workers == 1:
        run()
    if worker:
        return 0
    if args.workers > 1:  # worker 0 in this process, workers 1, 2, ... in their own
        pinned = ["--metric", plan.metric, "--direction", direction]
        pinned += [a for path in default_config_files for a in ("--default-config", path)]
        commands = [studies.worker_command([*own, *pinned, "--worker-index", str(i), "--", *train])
                    for i in range(1, args.workers)]  # fmt: skip
        try:
            codes = studies.run_workers(commands, threads or 1, run)
        except KeyboardInterrupt:
            print("interrupted: the running trials are marked FAIL by the next sweep on this study", file=sys.stderr)
            return 130
        if any(c > 0 for c in codes):  # a worker stopped on an error it printed (a setting: 2; a bug: 1)
            return max(codes)
        for i, c in enumerate(codes, start=1):
            if c < 0:
                print(f"note: worker {i} was killed (signal {-c}); its trial is marked FAIL", file=sys.stderr)
    finish(study, plan, space, args, url)
    left = args.trials - studies.counts(study)["COMPLETE"]
    if left > 0:
        print(f"error: the study lacks {left} COMPLETE trial(s); run the same command again", file=sys.stderr)
        return 1
    return 0


def finish(study, plan, space, args: argparse.Namespace, url: str) -> None:
    """The table, the plots and the W&B summary; the best value and its command printed last."""
    from implicit_em.sweep import storage as storages
    from implicit_em.sweep import summary

    here = storages.local_file(url)
    out_dir = here.parent if here is not None else plan.root
    outputs = summary.write_table(study, plan.metric, out_dir)
    outputs.plots, notes = summary.save_plots(study, out_dir, plan.metric)
    best = summary.best_trial(study)
    command = best.user_attrs.get("command") if best else None
    if plan.wandb_project is not None:
        config = {"study": args.study, "metric": plan.metric, "direction": study.direction.name.lower(),
                  "sampler": args.sampler, "pruner": args.pruner, "trials": args.trials, "space": space.as_dict(),
                  "train_args": " ".join(plan.train_args), "storage": storages.masked(url)}  # fmt: skip
        note = summary.log_to_wandb(study, plan.metric, plan.wandb_project, out_dir, outputs, config, command)
        notes += [note] if note else []
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    summary.say(f"table: {outputs.csv}, {outputs.markdown}; plots: "
                f"{', '.join(str(p) for p in outputs.plots) or 'none'}")  # fmt: skip
    for line in summary.describe(study, plan.metric):
        summary.say(line)


if __name__ == "__main__":
    sys.exit(main())
