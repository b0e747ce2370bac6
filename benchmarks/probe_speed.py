#!/usr/bin/env python
"""The linear probe's two solvers on the same frozen features: accuracy and time.

Trains the default model through the project's training path (``ImplicitEMCLI``, what scripts/train.py
runs), then fits the paper's probe (:func:`implicit_em.eval.probe.sklearn_probe`: StandardScaler +
LogisticRegression lbfgs) and the fast one (:func:`implicit_em.eval.probe.torch_probe`) on train features,
both scored on the test features. Targets: accuracies within 0.3 points, torch at least 10x faster.

    python benchmarks/probe_speed.py                        # Fashion-MNIST, 10 epochs
    python benchmarks/probe_speed.py --data digits --epochs 1 --root_dir /tmp/bench   # a smoke run

The last stdout line is the speed ratio. Both solvers are warmed up on a small slice first (imports and
lazy initialisation are not timed); each is timed ``--repeats`` times and the median is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_CONFIGS = {"fashion_mnist": "configs/data/fashion_mnist.yaml", "digits": "configs/data/digits.yaml"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=sorted(DATA_CONFIGS), default="fashion_mnist")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the default model")
    p.add_argument("--root_dir", default=str(REPO / "runs" / "probe_speed"), help="where the run is written")
    p.add_argument("--repeats", type=int, default=3, help="timings per solver (median reported)")
    p.add_argument("--device", default="cpu", help="device of the torch probe's features (cpu, cuda)")
    p.add_argument("--threads", type=int, default=None, help="limit every thread pool (torch, BLAS, OpenMP)")
    return p.parse_args(argv)


def train(args) -> tuple:
    """Train through the project's CLI; return (module, datamodule) after fit."""
    from implicit_em.run.app import fit
    from implicit_em.run.cli import ImplicitEMCLI

    cli = ImplicitEMCLI(
        [
            "--config", str(REPO / DATA_CONFIGS[args.data]),
            "--trainer.max_epochs", str(args.epochs),
            "--trainer.default_root_dir", args.root_dir,
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--report.probe_method", "torch",
            "--report.kmeans", "false",
            "--components.every_n_epochs", "0",
            "--probe.every_n_epochs", "0",
        ],
        [REPO / "configs" / "default.yaml"],
    )  # fmt: skip
    fit(cli)
    return cli.model, cli.datamodule


def timed(fn, repeats: int) -> tuple[float, float]:
    """(result, median seconds) of ``repeats`` calls of ``fn``."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    limits = None
    if args.threads:
        from threadpoolctl import threadpool_limits

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        limits = threadpool_limits(args.threads)
    import torch

    from implicit_em.eval.probe import sklearn_probe, torch_probe
    from implicit_em.run.report import features

    if args.threads:
        torch.set_num_threads(args.threads)
    module, dm = train(args)
    train_split, test_split = dm.splits["train"], dm.splits["test"]
    f_train, f_test = features(module, train_split.x).cpu(), features(module, test_split.x).cpu()
    y_train, y_test = train_split.y, test_split.y
    device = torch.device(args.device)
    ft_train, ft_test = f_train.to(device), f_test.to(device)
    yt_train, yt_test = y_train.to(device), y_test.to(device)

    def run_torch():
        acc = torch_probe(ft_train, yt_train, ft_test, yt_test)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return acc

    warm = slice(0, 300)
    sklearn_probe(f_train[warm], y_train[warm], f_test[warm], y_test[warm])
    torch_probe(ft_train[warm], yt_train[warm], ft_test[warm], yt_test[warm])

    print(
        f"data {args.data}: {len(y_train)} train / {len(y_test)} test, K = {f_train.shape[1]} features after "
        f"{args.epochs} epochs; torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"torch probe on {device}"
    )
    sk_acc, sk_s = timed(lambda: sklearn_probe(f_train, y_train, f_test, y_test), args.repeats)
    print(f"sklearn probe (paper protocol): accuracy {sk_acc:.4f}  time {sk_s:.3f} s")
    t_acc, t_s = timed(run_torch, args.repeats)
    print(f"torch probe:                    accuracy {t_acc:.4f}  time {t_s:.3f} s")
    diff = 100 * abs(sk_acc - t_acc)
    ratio = sk_s / t_s
    print(f"agreement: {diff:.2f} points ({'ok' if diff <= 0.3 else 'MISSED'}: target <= 0.3)")
    print(f"speed: target >= 10x: {'ok' if ratio >= 10 else 'MISSED'}")
    if limits is not None:
        limits.restore_original_limits()
    print(f"speed ratio (sklearn / torch): {ratio:.3g}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
