"""The experiments' figures, drawn with matplotlib's object API (the caller's backend is left alone)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from torch import Tensor

from implicit_em.experiments.tables import FORMATS


def _save(fig: Figure, path: Path) -> Path:
    """The figure as a PNG, cropped to what it draws; a constrained-layout figure is laid out to fit already, and
    cropping would draw it twice (a fifth of the time of each of a frontier's eight figures)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches=None if fig.get_layout_engine() is not None else "tight")
    return path


def plot_identity(r: Tensor, grad: Tensor, path: Path, title: str) -> Path:
    """Scatter of dL_LSE/dd against the responsibilities, with the line y = x."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.scatter(r.flatten().numpy(), grad.flatten().numpy(), s=4, alpha=0.4)
    top = float(max(r.max(), grad.max())) * 1.05
    ax.plot([0, top], [0, top], "k--", lw=1, label="y = x")
    ax.set(xlabel="responsibility $r_{ij}$", ylabel=r"$\partial L_{LSE} / \partial d_{ij}$", title=title)
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_bars(rows: Sequence[dict], label: str, metrics: Sequence[str], path: Path, title: str) -> Path:
    """One panel per metric: a bar per row (mean over seeds, error bar = std)."""
    fig = Figure(figsize=(3.2 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    names = [str(r[label]) for r in rows]
    for ax, metric in zip(axes[0], metrics):
        means = [r.get(metric) for r in rows]
        stds = [r.get(f"{metric}_std") or 0.0 for r in rows]
        ok = [i for i, m in enumerate(means) if m is not None]
        ax.bar([names[i] for i in ok], [means[i] for i in ok], yerr=[stds[i] for i in ok], capsize=3, color="C0")
        ax.set_title(FORMATS.get(metric, (metric,))[0])
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_curves(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Training loss per epoch, one panel per optimiser, one line per learning rate (mean over seeds)."""
    import numpy as np

    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig = Figure(figsize=(5 * len(optimizers), 3.8))
    axes = fig.subplots(1, len(optimizers), squeeze=False)
    for ax, opt in zip(axes[0], optimizers):
        for i, row in enumerate(r for r in rows if r["optimizer"] == opt):
            curves = np.asarray([s["loss_curve"] for s in row["per_seed"]], dtype=float)  # seeds x epochs
            epochs = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(0), curves.std(0)
            ax.plot(epochs, mean, color=f"C{i}", label=f"lr {row['lr']:g}")
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        ax.set(title=opt.upper() if opt == "sgd" else opt.capitalize(), xlabel="epoch", ylabel="training loss")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def side_by_side(images: Sequence[Path], path: Path) -> Path:
    """Place saved PNGs (each with its own title) next to each other in one figure."""
    import matplotlib.image

    fig = Figure(figsize=(6 * len(images), 6))
    axes = fig.subplots(1, len(images), squeeze=False)
    for ax, image in zip(axes[0], images):
        ax.imshow(matplotlib.image.imread(image))
        ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


def row_label(row: dict) -> str:
    """A row's name in a legend: its model, and its k where it has one."""
    return str(row["model"]) + (f" (k={row['k']})" if row.get("k") else "")


def draw_against_l0(ax, rows: Sequence[dict], metric: str, ylabel: str, lower: bool | None = None) -> bool:
    """``metric`` against L0 on ``ax``: one line per model over its rows (the target L0s), a lone marker for a
    model with one row. False (nothing drawn) when no row has both numbers."""
    have = [r for r in rows if _finite(r.get(metric)) and _finite(r.get("l0"))]
    for i, name in enumerate(dict.fromkeys(row_label(r) for r in have)):
        pts = sorted((max(r["l0"], 1e-2), r[metric]) for r in have if row_label(r) == name)
        ax.plot(*zip(*pts), marker="o", label=name, color=f"C{i % 10}", linestyle="-" if len(pts) > 1 else "none")
    ax.set(xscale="log", xlabel="L0 (active components per input)", ylabel=ylabel)
    if lower is not None:
        ax.set_title(f"{'lower' if lower else 'higher'} is better")
    if have:
        ax.legend(fontsize=7)
    return bool(have)


def draw_against_tokens(ax, curves: Sequence[dict], metric: str, ylabel: str, lower: bool | None = None) -> bool:
    """``metric`` against the training tokens on ``ax`` (log x): one line per model and target L0 over its
    ``points`` (each at its ``x``), a lone marker for a curve with one point. False (nothing drawn) when no
    point has both numbers."""
    drawn = False
    for i, c in enumerate(curves):
        pts = sorted((p["x"], p[metric]) for p in c["points"] if _finite(p.get(metric)) and _finite(p.get("x")))
        if not pts:
            continue
        label = str(c["model"]) + (f" k={c['target_l0']}" if c.get("target_l0") is not None else "")
        ax.plot(*zip(*pts), marker="o", label=label, color=f"C{i % 10}", linestyle="-" if len(pts) > 1 else "none")
        drawn = True
    ax.set(xscale="log", xlabel="training tokens (rows each trained row saw)", ylabel=ylabel)
    if lower is not None:
        ax.set_title(f"{'lower' if lower else 'higher'} is better")
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def draw_sparse_probing(ax, rows: Sequence[dict], ks: Sequence[int]) -> None:
    """k-sparse probing (``sparse_probe_accuracy``) against k on ``ax``, one line per row."""
    for i, r in enumerate(rows):
        sparse = r.get("sparse_probe_accuracy") or {}
        shown = [int(k) for k, v in sparse.items() if _finite(v)]
        if shown:
            ax.plot(shown, [sparse[str(k)] for k in shown], marker="o", label=row_label(r), color=f"C{i % 10}")
    ax.set(xscale="log", xlabel="k", ylabel="balanced accuracy", title="k-sparse probing")
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.legend(fontsize=7)


def draw_curves(ax, rows: Sequence[dict]) -> bool:
    """Each row's ``train_curve`` ([step, loss]) on ``ax``, log scale; False when no row has two points."""
    have = [r for r in rows if len(r.get("train_curve") or []) >= 2]
    for i, r in enumerate(have):
        ax.plot(*zip(*r["train_curve"]), label=f"{r['model']} k={r.get('target_l0')}", color=f"C{i % 10}")
    ax.set(yscale="log", xlabel="training step", ylabel="training MSE")
    if have:
        ax.legend(fontsize=7)
    return bool(have)


def panels(path: Path, title: str, *draw) -> Path | None:
    """A figure of one panel per ``draw`` (a function of an Axes returning whether it drew anything), saved at
    ``path``; None (no file) when no panel drew anything."""
    fig = Figure(figsize=(5.5 * len(draw), 4.2), layout="constrained")
    axes = fig.subplots(1, len(draw), squeeze=False)[0]
    drawn = [fn(ax) is not False for ax, fn in zip(axes, draw)]
    if not any(drawn):
        return None
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
