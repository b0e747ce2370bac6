"""The SAE baselines' training recipe change by change (docs/baselines.md): the TopK and BatchTopK SAEs trained with
the recipe their configs now default to, with the previous recipe, and with each change undone alone; for each run
the FVU of its own decoder on the test rows, the mean L0 on the training and test rows (codes > 0), the dead
fraction over the training rows and the training time. One table row per run, printed as each run ends.

    python benchmarks/sae_recipe.py --data_root /tmp/bl-harvest --components 2304 --k 32 --epochs 3
    python benchmarks/sae_recipe.py --components 256 --k 8 --epochs 5            # digits, a smoke run
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

#: each change of the recipe undone alone (the module's and the nets' settings)
UNDO = {
    "unit_norm": ["--model.net.unit_norm_decoder", "false"],
    "b_dec_mean": ["--model.data_init", "false"],
    "gao_lr_schedule": ["--model.lr", "0.001", "--model.lr_warmup_steps", "0", "--model.lr_decay_fraction", "0"],
    "auxk_rows": None,  # the previous AuxK: none for TopK, a window of 256 steps for BatchTopK (set per model)
    "threshold_fit": ["--model.net.threshold_fit", "running"],
}


def previous_auxk(model: str, batch_size: int) -> list[str]:
    """The AuxK of the previous recipe: the TopK SAE had none; the BatchTopK SAE's dead window was 256 steps."""
    if model == "topk_sae":
        return ["--model.net.aux_coefficient", "0"]
    return ["--model.net.dead_rows", str(256 * batch_size)]


def variants(model: str, batch_size: int) -> dict[str, list[str]]:
    undo = {**UNDO, "auxk_rows": previous_auxk(model, batch_size)}
    if model == "topk_sae":
        undo.pop("threshold_fit")
    rows = {"recipe": []}
    rows.update({f"recipe - {name}": args for name, args in undo.items()})
    rows["recipe, lr 1e-3"] = ["--model.lr", "0.001"]  # Gao's rate against the previous one, with warm-up and decay
    rows["previous"] = [a for args in undo.values() for a in args]
    return rows


@torch.no_grad()
def scores(module, dm) -> dict[str, float]:
    """Decoder FVU on the test rows, mean L0 (codes > 0) on the training and test rows, dead fraction (train)."""
    net = module.model.eval()
    train, test = dm.splits["train"].x, dm.splits["test"].x
    codes_train = torch.cat([net(x) for x in train.split(4096)])
    codes_test = torch.cat([net(x) for x in test.split(4096)])
    x_hat = torch.cat([net.decode(c) for c in codes_test.split(4096)])
    fvu = float((test - x_hat).pow(2).sum() / (test - test.mean(0)).pow(2).sum())
    return {
        "fvu_test": fvu,
        "l0_train": float((codes_train > 0).sum(1).float().mean()),
        "l0_test": float((codes_test > 0).sum(1).float().mean()),
        "dead_train": float(((codes_train > 0).sum(0) == 0).float().mean()),
    }


def train(args: list[str]):
    from implicit_em.run.cli import ImplicitEMCLI
    from implicit_em.run.runtime import training_process

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        cli = ImplicitEMCLI(args, [REPO / "configs" / "default.yaml"])
        start = time.perf_counter()
        with training_process():
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model, cli.datamodule, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_root", help="an activations harvest (scripts/harvest.py); default: the digits")
    p.add_argument("--components", type=int, default=2304)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["topk_sae", "batchtopk_sae"])
    p.add_argument("--only", nargs="+", help="the variants to run (default: all)")
    p.add_argument("--out", default="/tmp/sae-recipe-runs")
    a = p.parse_args()
    data = ["--config", str(REPO / "configs" / "data" / "activations.yaml"), "--data.root", a.data_root]
    common = [*(data if a.data_root else []), "--data.batch_size", str(a.batch_size),
              "--model.n_components", str(a.components), "--model.k", str(a.k), "--trainer.max_epochs", str(a.epochs),
              "--seed_everything", str(a.seed), "--trainer.default_root_dir", a.out,
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.logger", "false", "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0",
              "--components.every_n_epochs", "0", "--probe.every_n_epochs", "0"]  # fmt: skip
    print(f"{'model':<14} {'variant':<28} {'FVU test':>9} {'L0 train':>9} {'L0 test':>8} {'dead':>6} {'train s':>8}")
    for model in a.models:
        config = ["--config", str(REPO / "configs" / "model" / f"{model}.yaml")]
        for name, extra in variants(model, a.batch_size).items():
            if a.only and name not in a.only:
                continue
            module, dm, seconds = train([*config, *common, *extra])
            s = scores(module, dm)
            print(f"{model:<14} {name:<28} {s['fvu_test']:>9.4f} {s['l0_train']:>9.2f} {s['l0_test']:>8.2f} "
                  f"{s['dead_train']:>6.3f} {seconds:>8.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
