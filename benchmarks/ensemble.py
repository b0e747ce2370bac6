"""Ensembles: the paper's 12-model ablation (4 configs x 3 seeds, configs/experiment/ablation.yaml) trained as
one run, against one model alone, both through scripts/train.py in the same run. Members are separate models
(each bitwise equal to its lone run), so the ensemble costs about what its members cost in separate runs,
minus the per-run overhead; the last line is the wall-time ratio ensemble / one model (12 members: about 12).

    python benchmarks/ensemble.py                          # Fashion-MNIST, 3 epochs each
    python benchmarks/ensemble.py --data digits --epochs 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics

from throughput import REPO, project_epochs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "digits"])
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is excluded as warm-up)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = p.parse_args()
    ablation = ["--config", str(REPO / "configs" / "experiment" / "ablation.yaml")]
    n_members = 4 * len(args.seeds)
    fast = ["--report.kmeans", "false", "--report.probe_method", "torch", "--trainer.enable_progress_bar", "false"]

    def epoch_time(extra: list[str]) -> float:
        seconds = project_epochs(args.data, args.epochs, fast + extra)["epoch_seconds"]
        return statistics.median(seconds[1:] or seconds)

    one = epoch_time(["--seed_everything", str(args.seeds[0])])
    many = epoch_time([*ablation, "--model.init_args.seeds", json.dumps(args.seeds)])
    print(f"data {args.data}: one model {one:.3f} s/epoch; {n_members}-member ablation ensemble {many:.3f} s/epoch")
    print(f"per model: {many / n_members:.3f} s/epoch ({n_members * one / many:.2f}x the throughput of separate runs)")
    print(f"ratio ensemble/one: {many / one:.2f}")


if __name__ == "__main__":
    main()
