#!/usr/bin/env python
"""Train the sparsify peer on a harvest: ``python scripts/train_peer.py --data-root SHARDS --components K --k k
--tokens N --seed S --out DIR``.

sparsify's SparseCoder, trained by sparsify's own Trainer and recipe (``implicit_em.lm.peers``) on the rows and
in the order our runs with ``--seed_everything S`` train on (the split and batch of configs/data/activations.yaml),
raw. DIR is sparsify's folder (cfg.json, sae.safetensors) plus peer.json; ``implicit_em.load(DIR)`` reads it. The
last stdout line is DIR. Errors print one line and exit with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from implicit_em.errors import OneLineArgumentParser

REPO = Path(__file__).resolve().parents[1]


def data_settings(configs: Path) -> dict:
    """The ActivationsDataModule settings of our runs (configs/data/activations.yaml's init_args)."""
    import yaml

    from implicit_em.errors import ConfigError

    path = configs / "data" / "activations.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass --configs DIR holding data/activations.yaml")
    return dict(yaml.safe_load(path.read_text())["data"]["init_args"])


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True, help="the harvest's folder of shards")
    p.add_argument("--components", type=int, required=True, help="K, sparsify's num_latents")
    p.add_argument("--k", type=int, required=True, help="the codes kept per row (sparsify's k, the L0)")
    p.add_argument("--tokens", type=int, required=True, help="training rows in all (epochs x training rows: as ours)")
    p.add_argument("--seed", type=int, default=0, help="sparsify's init seed and our runs' data order")
    p.add_argument("--out", type=Path, required=True, help="the folder written (an earlier peer there is replaced)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default: our runs', from --configs)")
    p.add_argument("--configs", type=Path, default=REPO / "configs", help="where data/activations.yaml is")
    p.add_argument("--optimizer", choices=("signum", "adam", "muon"), default=None, help="default: sparsify's")
    p.add_argument("--lr", type=float, default=None, help="default: sparsify's rule for the optimizer and K")
    p.add_argument("--auxk-alpha", type=float, default=None, help="weight of AuxK (default: sparsify's)")
    p.add_argument("--device", default="cpu", help="where the coder trains (cpu, cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    from implicit_em.errors import check, report_user_error

    try:
        import torch

        from implicit_em.lm.activations import ActivationsDataModule
        from implicit_em.lm.peers import train_peer

        if a.threads is not None:
            check(a.threads >= 1, "--threads", "an integer >= 1", a.threads)
            torch.set_num_threads(a.threads)
        settings = {**data_settings(a.configs), "root": str(a.data_root), "shuffle_seed": a.seed}
        if a.batch_size is not None:
            settings["batch_size"] = a.batch_size
        options = {"optimizer": a.optimizer, "lr": a.lr, "auxk_alpha": a.auxk_alpha}
        datamodule = ActivationsDataModule(**settings)
        out = train_peer(datamodule, a.components, a.k, a.tokens, a.seed, a.out, device=a.device,
                         **{k: v for k, v in options.items() if v is not None})  # fmt: skip
    except Exception as e:  # settings or files a user can fix: one line, exit code 2
        return report_user_error(e)
    print(out.resolve(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
