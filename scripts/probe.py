#!/usr/bin/env python
"""Evaluate a checkpoint on frozen features: ``python scripts/probe.py CHECKPOINT [--probe-method torch]``.

Rebuilds the model and data from the run's saved config.yaml, loads the weights, and prints the same
numbers as the run's metrics.json (linear probe, clustering vs KMeans, diagnostics) as JSON.
"""

import json
import sys

from implicit_em.errors import OneLineArgumentParser, report_user_error
from implicit_em.run.app import evaluate_checkpoint


def main(argv=None) -> int:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a .ckpt file written by scripts/train.py")
    p.add_argument("--config", help="the run's config.yaml (default: the one beside the checkpoint's run)")
    p.add_argument("--probe-method", choices=["sklearn", "torch"], default="sklearn")
    p.add_argument("--no-kmeans", action="store_true", help="skip the KMeans baseline")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    overrides = ["--report.probe_method", args.probe_method, "--report.kmeans", str(not args.no_kmeans).lower()]
    try:
        metrics = evaluate_checkpoint(args.checkpoint, args.config, overrides)
    except Exception as e:  # settings or data a user can fix: one line, their exit code
        return report_user_error(e)
    text = json.dumps(metrics, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
