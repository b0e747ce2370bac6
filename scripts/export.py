#!/usr/bin/env python
"""Export a run in the layout SAELens loads: ``python scripts/export.py RUN_DIR --out DIR``.

Writes DIR/sae_weights.safetensors (W_enc d_in x K, b_enc K, W_dec K x d_in, b_dec d_in) and DIR/cfg.json, the
data's normalisation folded in: raw activations in, raw activations out. RUN_DIR may also be a .ckpt file.
Errors print one line and exit with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from implicit_em.errors import OneLineArgumentParser


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory (scripts/train.py's) or one of its checkpoints")
    p.add_argument("--out", type=Path, required=True, help="the export directory (created)")
    p.add_argument(
        "--use-readout", action="store_true", help="SAE baselines: export the fitted ridge readout, not their decoder"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in a folder that is not empty")
    a = p.parse_args(argv)
    from implicit_em.errors import report_user_error
    from implicit_em.export import export_run

    try:
        out = export_run(a.run, a.out, use_readout=a.use_readout or None, overwrite=a.overwrite)
    except Exception as e:  # settings or files a user can fix: one line, exit code 2
        return report_user_error(e)
    print(out.resolve(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
