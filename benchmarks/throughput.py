"""Training speed of ``scripts/train.py`` against a plain PyTorch loop, measured side by side in one run.

The plain loop does the same work as the default model: Linear(D -> 64) + ReLU, the LSE + variance +
decorrelation objective, Adam 1e-3, batch 128, one randperm per epoch over an in-memory tensor. The
project runs as users run it (default logging, metrics, checkpointing, component images, probe during
training), and reports ``epoch_seconds`` in metrics.json. The plain loop runs before and after the project
so a drift in machine load shows. The last line is the ratio: project epoch / fastest plain epoch.

    python benchmarks/throughput.py                      # Fashion-MNIST, 4 project epochs
    python benchmarks/throughput.py --data digits --epochs 2 --plain-epochs 2   # a smoke run
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def load_train_images(data: str) -> torch.Tensor:
    """All training images, float32 in [0, 1], read directly (the project is not imported here: importing
    Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, which slows every torch optimiser step on machines
    without NVML; the project undoes that for its own training, a bare loop would not)."""
    if data == "digits":
        from sklearn.datasets import load_digits

        return torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    raw = gzip.open(FASHION_MNIST).read()
    return torch.tensor(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784).astype(np.float32) / 255.0)


def plain_loop(x: torch.Tensor, epochs: int, batch_size: int = 128, k: int = 64) -> list[float]:
    """Seconds per epoch of the reference loop: nothing but the model, the objective and Adam."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], k)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-3)
    off_diagonal = 1 - torch.eye(k)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in torch.randperm(len(x)).split(batch_size):
            d = torch.relu(linear(x[idx]))
            lse = -torch.logsumexp(-d, dim=1).sum()
            var = -torch.log(d.var(0) + 1e-6).sum()
            c = d - d.mean(0)
            sd = torch.sqrt(d.var(0) + 1e-8)
            corr = (c.T @ c) / (len(d) - 1) / (sd[:, None] * sd[None, :])
            tc = (corr * off_diagonal).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            (lse + var + tc).backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return times


def project_epochs(data: str, epochs: int, extra: list[str]) -> dict:
    """Run scripts/train.py as a user does and return its metrics.json."""
    config = [] if data == "digits" else ["--config", f"configs/data/{data}.yaml"]
    cmd = [sys.executable, "scripts/train.py", *config, "--trainer.max_epochs", str(epochs),
           "--trainer.default_root_dir", "/tmp/implicit_em_throughput", *extra]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(Path(out.strip().splitlines()[-1]).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "digits"])
    p.add_argument("--epochs", type=int, default=4, help="project epochs (the first is excluded as warm-up)")
    p.add_argument("--plain-epochs", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads of the plain loop (the project uses torch's default)"
    )
    p.add_argument("extra", nargs="*", help="more scripts/train.py arguments, after --")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = load_train_images(args.data)
    before = plain_loop(x, args.plain_epochs)
    metrics = project_epochs(args.data, args.epochs, args.extra)
    after = plain_loop(x, args.plain_epochs)
    seconds = metrics["epoch_seconds"]
    project = statistics.median(seconds[1:] or seconds)
    plain = min(statistics.median(before), statistics.median(after))
    print(f"data {args.data}: {len(x)} training images in the plain loop; the project trains on its train split")
    print(f"plain loop s/epoch: before {statistics.median(before):.3f}, after {statistics.median(after):.3f}")
    print(f"project s/epoch (median of epochs 2..{len(seconds)}): {project:.3f}  all: {[round(s, 3) for s in seconds]}")
    print(f"probe_accuracy after {len(seconds)} epochs: {metrics['probe_accuracy']:.4f}")
    per_sample = (project / metrics["n_train"]) / (plain / len(x))
    print(f"per-sample ratio (project trains on {metrics['n_train']} samples an epoch): {per_sample:.2f}")
    print(f"ratio project/plain: {project / plain:.2f}")


if __name__ == "__main__":
    main()
