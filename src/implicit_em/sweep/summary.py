"""The end of a sweep: the table of all trials (CSV and markdown), Optuna's plots (optimisation history,
parameter importances), the best trial and the ``scripts/train.py`` command that reproduces it, and the same
sent to W&B as a run in the study's group."""

from __future__ import annotations

import csv
import io
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

#: the table's columns before the parameters
COLUMNS = ("trial", "state", "value", "epochs", "seconds")


@dataclass
class Outputs:
    """The files a summary wrote."""

    csv: Path
    markdown: Path
    plots: list[Path] = field(default_factory=list)


def trial_rows(study: optuna.Study) -> tuple[list[str], list[dict]]:
    """(columns, one row per trial in trial order): number, state, value, epochs reported, seconds, each
    parameter, run_dir; trials withdrawn before they ran are left out."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("withdrawn")]
    names = sorted({k for t in trials for k in t.params})
    rows = []
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append({
            "trial": t.number, "state": t.state.name, "value": t.value,
            "epochs": max(t.intermediate_values) + 1 if t.intermediate_values else None,
            "seconds": None if seconds is None else round(seconds, 1),
            **{k: t.params.get(k) for k in names}, "run_dir": t.user_attrs.get("run_dir"),
        })  # fmt: skip
    return [*COLUMNS, *names, "run_dir"], rows


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def markdown_table(columns: list[str], rows: list[dict], best: int | None, metric: str) -> str:
    """The trials as a markdown table, best value first (COMPLETE trials by value, then the others by
    number); the best trial in bold."""
    head = [metric if c == "value" else c for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r[c]) for c in columns]
        if r["trial"] == best:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sorted_rows(rows: list[dict], maximize: bool) -> list[dict]:
    def key(r):
        done = r["state"] == "COMPLETE" and r["value"] is not None and math.isfinite(r["value"])
        return (0, -r["value"] if maximize else r["value"], r["trial"]) if done else (1, 0.0, r["trial"])

    return sorted(rows, key=key)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial (None while there is none)."""
    try:
        return study.best_trial
    except ValueError:
        return None


def write_table(study: optuna.Study, metric: str, out_dir: Path) -> Outputs:
    """``<study>_trials.csv`` (trial order) and ``<study>_trials.md`` (best first) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns, rows = trial_rows(study)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = Outputs(out_dir / f"{study.study_name}_trials.csv", out_dir / f"{study.study_name}_trials.md")
    paths.csv.write_text(buffer.getvalue())
    best = best_trial(study)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    paths.markdown.write_text(markdown_table(columns, sorted_rows(rows, maximize), best and best.number, metric))
    return paths


def save_plots(study: optuna.Study, out_dir: Path, metric: str) -> tuple[list[Path], list[str]]:
    """Optuna's optimisation history and parameter importances as PNG (matplotlib) and, where plotly is
    installed, as interactive HTML; returns (files, notes on the plots that could not be drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna import visualization as vis
    from optuna.visualization import matplotlib as vis_mpl

    out_dir.mkdir(parents=True, exist_ok=True)
    made, notes = [], []
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return made, ["no COMPLETE trial to plot"]
    plots = {"history": "plot_optimization_history", "importances": "plot_param_importances"}
    searched = {name for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) for name in t.params}
    if len(searched) < 2:  # one parameter has all the importance: nothing to rank (and fANOVA costs seconds)
        del plots["importances"]
        notes.append(f"importances: the study searches {len(searched)} parameter(s); nothing to rank")
    for name, fn in plots.items():
        path = out_dir / f"{study.study_name}_{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = getattr(vis_mpl, fn)(study, target_name=metric)
                ax.figure.set_size_inches(7, 4.5)
                ax.figure.tight_layout()
                ax.figure.savefig(path, dpi=120)
                plt.close(ax.figure)
            made.append(path)
        except Exception as e:  # too few COMPLETE trials, one parameter that never varied, ...
            notes.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        if vis.is_available():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figure = getattr(vis, fn)(study, target_name=metric)
            html = path.with_suffix(".html")
            figure.write_html(str(html), include_plotlyjs="cdn")
            made.append(html)
    return made, notes


def log_to_wandb(study: optuna.Study, metric: str, project: str, folder: Path, outputs: Outputs, config: dict,
                 command: str | None) -> str | None:  # fmt: skip
    """A W&B run ``<study>/summary`` in the study's group: the trials' table, the plots and the best trial;
    offline by itself without a key or connection. Returns a note when W&B could not take it."""
    try:
        import wandb

        from implicit_em.run.loggers import wandb_mode

        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=project, group=study.study_name, job_type="sweep", name=f"{study.study_name}/summary",
                         dir=str(folder), mode=wandb_mode(), config=config,
                         settings=wandb.Settings(init_timeout=30, silent=True))  # fmt: skip
        columns, rows = trial_rows(study)
        table = wandb.Table(columns=columns, data=[[_plain(r[c]) for c in columns] for r in rows])
        images = {f"sweep/{p.stem.split('_')[-1]}": wandb.Image(str(p)) for p in outputs.plots if p.suffix == ".png"}
        run.log({"sweep/trials": table, **images})
        best = best_trial(study)
        if best is not None:
            run.summary.update({f"best/{metric}": best.value, "best/trial": best.number, "best/command": command,
                                **{f"best/{k}": v for k, v in best.params.items()}})  # fmt: skip
        run.finish()
    except Exception as e:
        return f"W&B summary not logged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def _plain(v):
    return v if v is None or isinstance(v, (int, float, str, bool)) else str(v)


def describe(study: optuna.Study, metric: str) -> list[str]:
    """The lines a sweep ends with: the trials' states, the best value and its run, and the command."""
    c = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        if not t.user_attrs.get("withdrawn"):
            c[t.state.name] += 1
    states = ", ".join(f"{n} {name}" for name, n in c.items() if n)
    lines = [f"study {study.study_name}: {states or 'no trials'}"]
    best = best_trial(study)
    if best is None:
        return [*lines, "no COMPLETE trial yet"]
    return [
        *lines,
        f"best {metric} {best.value:.6g}: trial {best.number}, {best.user_attrs.get('run_dir')}",
        f"reproduce: {best.user_attrs.get('command')}",
    ]


def say(line: str) -> None:
    print(line, flush=True)
    sys.stdout.flush()
