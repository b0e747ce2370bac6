"""Time per epoch and peak memory as the model grows: K in {64, 256, 1024, 4096}, D in {784, 3072}.

Each setting is one scripts/train.py run on the synthetic mixture (D dims) with the default objective,
Adam and batch 128, limited to a few Lightning batches per epoch; the second epoch's time is scaled to a
60,000-sample epoch. Peak memory is the process's resident set on a CPU, allocated memory on a GPU.
Prints a markdown table.

    python benchmarks/scale.py                          # the full table (CPU: a few minutes)
    python benchmarks/scale.py --k 64 --d 784 --batches 1  # a smoke run
"""

from __future__ import annotations

import argparse

from throughput import project_epochs

EPOCH_SAMPLES = 60_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--d", type=int, nargs="+", default=[784, 3072])
    p.add_argument("--batches", type=int, default=2, help="Lightning batches (8 optimiser steps each) per epoch")
    p.add_argument("--accelerator", default="auto")
    args = p.parse_args()
    print("| D | K | s/epoch (60k samples) | peak memory (MB) | device |")
    print("|---|---|---|---|---|")
    for d in args.d:
        for k in args.k:
            extra = [
                "--data.dims", str(d), "--data.n_true_components", "10", "--data.n_samples", "8192",
                "--data.n_test", "512", "--model.n_components", str(k), "--trainer.accelerator", args.accelerator,
                "--trainer.limit_train_batches", str(args.batches), "--report.kmeans", "false",
                "--report.probe_method", "torch", "--features.every_n_epochs", "0", "--probe.every_n_epochs", "0",
                "--trainer.enable_progress_bar", "false",
            ]  # fmt: skip
            m = project_epochs("synthetic", 2, extra)
            steps = min(args.batches * 8, -(-m["n_train"] // 128))
            per_epoch = m["epoch_seconds"][-1] / (steps * 128) * EPOCH_SAMPLES
            device = m.get("device", args.accelerator)
            print(f"| {d} | {k} | {per_epoch:.2f} | {m['peak_memory_mb']:.0f} | {device} |", flush=True)


if __name__ == "__main__":
    main()
