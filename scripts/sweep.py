#!/usr/bin/env python
"""Search train.py's settings with Optuna (needs ``pip install 'implicit-em[sweep]'``; docs/sweep.md):

    python scripts/sweep.py --space configs/sweep/paper_fashion_mnist.yaml --study fmnist --trials 30 \
        --workers 2 --root runs/sweeps -- --config configs/data/fashion_mnist.yaml --trainer.max_epochs 5

Every trial is an ordinary run of scripts/train.py under --root, scored on the validation split; at the end the
best value and the train.py command that reproduces it are printed, and a table of all trials is written beside
the storage. ``--help`` lists every option.
"""

import sys
from pathlib import Path

from implicit_em.sweep.cli import main as sweep_main

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def main(argv=None) -> int:
    return sweep_main(argv, default_config_files=[DEFAULT_CONFIG])


if __name__ == "__main__":
    sys.exit(main())
