"""The experiments' figures, drawn with matplotlib's object API (the caller's backend is left alone)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from torch import Tensor

from implicit_em.experiments.tables import LABELS


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
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
        ax.set_title(LABELS.get(metric, (metric,))[0])
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
            curves = np.asarray(row["per_seed"]["loss_curve"], dtype=float)  # seeds x epochs
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
