#!/usr/bin/env python
"""A component dashboard of a run, in the browser: ``python scripts/dashboard.py RUN_DIR --out DIR``.

An SAE folder (SAELens's, sparsify's or scripts/export.py's) opens the same way over a harvest it reads:
``python scripts/dashboard.py SAE_DIR --data-root HARVEST --out DIR``.

One streaming pass over the run's data (a harvest's tokens, or an image dataset) keeps, per component, the
top-activating contexts, samples from each activation quantile, the histogram and the density, in memory
bounded by K x N. DIR gets static pages that open from the file system (index.html: one row per component,
sortable and filterable; component.html#J: one component), Neuronpedia-shaped JSON (DIR/neuronpedia) and
summary.json (speed and peak memory of the pass). --wandb also logs the index as a W&B Table and pages as HTML.
Errors print one line and exit with code 2; the last stdout line is DIR.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from implicit_em.errors import OneLineArgumentParser

    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory (scripts/train.py's), or an SAE folder (SAELens's, "
                   "sparsify's or scripts/export.py's) with --data-root")  # fmt: skip
    p.add_argument("--data-root", type=Path, default=None,
                   help="for an SAE folder: the harvest (shards and tokens) it reads, raw activations")  # fmt: skip
    p.add_argument("--out", type=Path, required=True,
                   help="the dashboard folder: new, empty, or an earlier dashboard of the same run")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="write the dashboard into a folder that holds other files (its namesakes are replaced)")  # fmt: skip
    p.add_argument("--split", default="all", choices=("all", "train", "val", "test"),
                   help="rows to read: all, or the run's train/val/test split (held-out documents)")  # fmt: skip
    p.add_argument("--max-rows", type=int, default=1_000_000, help="read at most this many rows (the first ones)")
    p.add_argument("--top", type=int, default=20, help="top-activating contexts kept per component")
    p.add_argument("--samples", type=int, default=25, help="active rows sampled per component (cut into quantiles)")
    p.add_argument("--quantiles", type=int, default=5, help="quantile groups of the sample")
    p.add_argument("--context", type=int, default=48, help="tokens shown per context (around its chosen token)")
    p.add_argument("--bins", type=int, default=32, help="histogram bins (a power of two)")
    p.add_argument("--skip-first", type=int, default=None,
                   help="the first N tokens of each context are left out of the statistics and never chosen (shown "
                        "in contexts); default: 1 for a causal LM (its first position is the attention sink), else 0")  # fmt: skip
    p.add_argument("--batch-rows", type=int, default=None, help="rows per batch of the pass (default: by K)")
    p.add_argument("--block", type=int, default=64, help="components per data file of the pages")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-neuronpedia", action="store_true", help="skip the Neuronpedia JSON")
    p.add_argument("--wandb", action="store_true",
                   help="log the index (Table) and pages (HTML, artifact) to W&B; offline without a key or network")  # fmt: skip
    p.add_argument("--wandb-pages", type=int, default=32, help="component pages logged as wandb.Html (densest first)")
    p.add_argument("--wandb-project", default="implicit-em")
    a = p.parse_args(argv)
    from implicit_em.errors import report_user_error

    try:
        import torch

        from implicit_em.lm.dashboard.build import Settings, build, check_out
        from implicit_em.lm.dashboard.stream import StreamConfig
        from implicit_em.run.app import load_run

        try:
            cfg = StreamConfig(top=a.top, samples=a.samples, quantiles=a.quantiles, bins=a.bins, context=a.context)
        except ValueError as e:
            from implicit_em.errors import exit_with_argument_error

            exit_with_argument_error(f"--{str(e).split()[0]}: {e}")
        settings = Settings(split=a.split, max_rows=a.max_rows, batch_rows=a.batch_rows, stream=cfg, block=a.block,
                            neuronpedia=not a.no_neuronpedia, skip_first=a.skip_first)  # fmt: skip
        check_out(a.out, a.run, a.overwrite)  # before the run loads
        run = load_run(a.run, a.data_root)
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        run.module.to(device)
        dash = build(a.run, a.out, settings, log=lambda s: print(s, file=sys.stderr, flush=True), run=run,
                     overwrite=a.overwrite)  # fmt: skip
        if a.wandb:
            from implicit_em.lm.dashboard.wandb_log import log_dashboard

            log_dashboard(dash, project=a.wandb_project, pages=a.wandb_pages)
    except Exception as e:  # settings or files a user can fix: one line, exit code 2
        return report_user_error(e)
    p_ = dash.summary["pass"]
    print(
        f"{dash.summary['components']} components ({dash.summary['dead']} dead) over {p_['rows']} rows: "
        f"{p_['components_per_s']:.0f} components/s, {p_['contexts_per_s']:.0f} contexts/s, "
        f"peak memory {p_['peak_rss_mb']:.0f} MB",
        file=sys.stderr,
    )
    print(Path(a.out).resolve(), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")  # no de-quantisation bars as a GGUF LM loads (tqdm reads it on import)
    sys.exit(main())
