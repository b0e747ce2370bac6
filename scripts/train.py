#!/usr/bin/env python
"""Train a model: ``python scripts/train.py [--config configs/<group>/<name>.yaml ...] [--section.key value ...]``.

With no arguments: the paper's model on scikit-learn's embedded digits. The last line on stdout is the
absolute path of the run's metrics.json. ``--help`` lists every option.
"""

import sys
from pathlib import Path

from implicit_em.run.app import main

if __name__ == "__main__":
    sys.exit(main(default_config_files=[Path(__file__).resolve().parents[1] / "configs" / "default.yaml"]))
