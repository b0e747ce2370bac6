"""The dashboard in W&B: the index as a ``wandb.Table``, component pages as ``wandb.Html``, the folder as an
artifact. Offline by itself (no API key, no connection, or ``WANDB_MODE=offline``) like every other log here:
the run's files stay under ``<dashboard>/wandb/offline-run-*`` for a later ``wandb sync``."""

from __future__ import annotations

from pathlib import Path

COLUMNS = ["component", "density", "mean_active", "max", "top", "histogram", "dead"]


def log_dashboard(dash, project: str = "implicit-em", pages: int = 32, run=None) -> Path | None:
    """Log ``dash`` (:class:`~implicit_em.lm.dashboard.build.Dashboard`) to ``run`` (a new W&B run when None,
    finished here); ``pages``: how many component pages (densest first) go in as ``wandb.Html``. Returns the
    run's local directory."""
    import wandb

    from implicit_em.lm.dashboard.html import standalone_page
    from implicit_em.run.loggers import open_wandb_run

    own = run is None
    if own:
        run = open_wandb_run(project, dash.out, "dashboard", f"dashboard {dash.meta['title']}", dash.summary)
    run.log({"dashboard/index": wandb.Table(columns=COLUMNS, data=[list(r) for r in dash.rows])})
    alive = sorted((r for r in dash.rows if not r[6]), key=lambda r: -r[1])[: max(pages, 0)]
    blocks: dict[int, dict] = {}
    for r in alive:
        j = r[0]
        first = j // dash.meta["block"] * dash.meta["block"]
        block = blocks.setdefault(first, dash.block(first))
        run.log({f"dashboard/component_{j}": wandb.Html(standalone_page(dash.meta, block, j), inject=False)})
    artifact = wandb.Artifact(f"dashboard-{run.id}", type="dashboard", metadata=dash.summary)
    for name in ("index.html", "component.html", "summary.json"):
        artifact.add_file(str(dash.out / name), name=name)
    for folder in ("data", "neuronpedia"):
        if (dash.out / folder).is_dir():
            artifact.add_dir(str(dash.out / folder), name=folder)
    run.log_artifact(artifact)
    where = Path(run.dir).parent if getattr(run, "dir", None) else None
    if own:
        run.finish()
    return where
