"""Reproduce the paper's experiments: ``python scripts/reproduce.py --experiment ablation benchmark --data digits``.

Writes ``<out>/<data>/<experiment>.json`` (per seed), ``.md`` (mean ± std) and PNG figures; the training
runs (through the same LightningModule and Trainer as scripts/train.py) go to ``<out>/<data>/runs``.
Defaults are the paper's protocol: K = 64, batch 128, Adam lr 1e-3, 100 epochs, lambdas 1, ReLU, seeds
1 2 3. ``--quick`` is the CI smoke run: digits, 5 epochs, seed 1. Bad arguments: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from implicit_em.errors import OneLineArgumentParser

REPO = Path(__file__).resolve().parents[1]
QUICK = {"data": "digits", "epochs": 5, "seeds": [1]}
DEFAULTS = {"data": "digits", "epochs": 100, "seeds": [1, 2, 3]}


def parser() -> argparse.ArgumentParser:
    from implicit_em.experiments import DATASETS, EXPERIMENTS

    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--experiment",
        nargs="+",
        choices=[*EXPERIMENTS, "all"],
        default=["all"],
        help="experiments to run (default: all)",
    )
    p.add_argument("--data", choices=DATASETS, default=None, help="configs/data/<data>.yaml (default: digits)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per run (default: 100)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds: init and data order (default: 1 2 3)")
    p.add_argument("--out", type=Path, default=REPO / "results", help="results folder (default: results/)")
    p.add_argument("--components", type=int, default=64, help="K (default: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the data config's, 128 for images)")
    p.add_argument(
        "--probe-method",
        choices=["sklearn", "torch"],
        default="sklearn",
        help="linear probe: sklearn (the paper's, default) or torch (fast)",
    )
    p.add_argument("--data-root", default=None, help="--data.root for the data config (MNIST, CIFAR-10 files)")
    p.add_argument(
        "--l0",
        type=int,
        nargs="+",
        default=None,
        help="target L0s (codes kept per input) of the frontier experiment (default: 16 32 64 128)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="frontier: train every trained row on N tokens (a harvest's rows: the fewest optimiser steps that reach "
        "N) instead of --epochs; several N: one frontier each in <out>/<data>/tokens_<N>/ and their curve in "
        "<out>/<data>/frontier_tokens.json",
    )
    p.add_argument(
        "--lm-tokens",
        type=int,
        default=20_480,
        help="predicted tokens of the held-out windows the causal LM runs again per row of compare and frontier "
        "(causal harvests; 0: off; default: 20480, SAEBench's)",
    )
    p.add_argument(
        "--lm-windows",
        type=int,
        default=None,
        help="that many held-out windows instead of --lm-tokens (quick runs; 0: off)",
    )
    p.add_argument(
        "--model-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="frontier: settings of this model's runs, e.g. net.distance=softplus (--model.net.distance softplus)",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="frontier: the rows to run (default: all that apply): implicit_em topk_sae batchtopk_sae sparsify_peer "
        "(activations only) random_encoder kmeans pca",
    )
    p.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="frontier: where rows are scored; val to choose settings without touching the test split",
    )
    p.add_argument(
        "--wandb",
        nargs="?",
        const="implicit-em",
        default=None,
        metavar="PROJECT",
        help="frontier: log its table and plots to this W&B project (default implicit-em; offline by itself)",
    )
    p.add_argument(
        "--sae",
        nargs="+",
        default=[],
        metavar="DIR",
        help="compare, frontier: saved SAE folders (SAELens, sparsify or scripts/export.py) judged beside the trained "
        "rows through their own decoders, one row each named after its folder",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: digits, 5 epochs, seed 1 (unless given)")
    return p


def settings(argv: list[str]):
    from implicit_em.experiments import Settings

    p = parser()
    a = p.parse_args(argv)
    base = QUICK if a.quick else DEFAULTS
    data, epochs, seeds = (getattr(a, k) if getattr(a, k) is not None else base[k] for k in ("data", "epochs", "seeds"))
    if epochs < 1:
        p.error(f"argument --epochs: must be >= 1 (got {epochs})")
    if len(set(seeds)) != len(seeds):
        p.error(f"argument --seeds: must be distinct (got {' '.join(map(str, seeds))})")
    if a.components < 2:
        p.error(f"argument --components: must be >= 2 (got {a.components})")
    if a.batch_size is not None and a.batch_size < 2:
        p.error(f"argument --batch-size: must be >= 2 (got {a.batch_size})")
    if not (REPO / "configs" / "data" / f"{data}.yaml").is_file():
        p.error(f"argument --data: configs/data/{data}.yaml does not exist")
    if a.l0 is not None and any(k < 1 or k > a.components for k in a.l0):
        p.error(f"argument --l0: each must lie in 1..--components ({a.components}) (got {' '.join(map(str, a.l0))})")
    if a.lm_windows is not None and a.lm_windows < 0:
        p.error(f"argument --lm-windows: must be >= 0 (got {a.lm_windows})")
    if a.lm_tokens < 0:
        p.error(f"argument --lm-tokens: must be >= 0 (got {a.lm_tokens})")
    if a.tokens is not None:
        if any(n < 1 for n in a.tokens):
            p.error(f"argument --tokens: each must be >= 1 (got {' '.join(map(str, a.tokens))})")
        if a.epochs is not None:
            p.error("argument --tokens: trains by tokens instead of --epochs; pass one of them")
        if a.experiment != ["frontier"]:
            p.error("argument --tokens: only the frontier trains by tokens; run it alone (--experiment frontier)")
    bad = [kv for kv in a.model_set if "=" not in kv or kv.startswith(("=", "-"))]
    if bad:
        p.error(f"argument --model-set: each must be KEY=VALUE, e.g. net.distance=softplus (got {' '.join(bad)})")
    from implicit_em.experiments.frontier import ROWS

    if a.rows is not None and (unknown := [r for r in a.rows if r not in ROWS]):
        p.error(f"argument --rows: unknown {' '.join(unknown)}; choose from {' '.join(ROWS)}")
    if missing := [d for d in a.sae if not Path(d).is_dir()]:
        p.error(f"argument --sae: not a folder: {' '.join(missing)} (pass the folders an SAE was saved in)")
    if a.sae and not set(a.experiment) & {"compare", "frontier"}:
        p.error("argument --sae: only compare and frontier judge saved SAEs; add --experiment compare or frontier")
    command = shlex.join(["python", "scripts/reproduce.py", *argv])
    s = Settings(REPO / "configs", data, a.out, epochs, list(seeds), a.components, a.batch_size, a.probe_method,
                 a.data_root, command)  # fmt: skip
    s.l0s = list(a.l0) if a.l0 is not None else None  # read by the frontier experiment only
    s.lm_windows, s.split, s.rows, s.wandb_project = a.lm_windows, a.split, a.rows, a.wandb
    s.lm_tokens, s.tokens = a.lm_tokens, list(a.tokens) if a.tokens is not None else None
    s.saes = [str(d) for d in a.sae]
    s.model_args = [arg for kv in a.model_set for arg in (f"--model.{kv.split('=', 1)[0]}", kv.split("=", 1)[1])]
    return s, a.experiment


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    s, experiments = settings(argv)
    os.environ.setdefault("WANDB_MODE", "offline")  # this script owns its process
    os.environ.setdefault("MPLBACKEND", "Agg")
    from implicit_em.errors import report_user_error
    from implicit_em.experiments import reproduce

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # after the import, which sets INFO

    try:
        reproduce(s, experiments, log=lambda line: print(line, flush=True))
    except Exception as e:  # settings or data a user can fix: one line, their exit code
        return report_user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
