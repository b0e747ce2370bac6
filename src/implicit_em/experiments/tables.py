"""Summaries of experiment results: mean +- std over seeds, markdown tables, the results files."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: column headers and number formats of the tables
LABELS = {
    "dead_components": ("dead components", ".1f"),
    "redundancy": ("redundancy", ".2f"),
    "responsibility_entropy": ("responsibility entropy", ".3f"),
    "probe_accuracy": ("probe accuracy", ".4f"),
    "l0_density": ("L0 density", ".3f"),
    "n_parameters": ("parameters", ".0f"),
    "reconstruction_mse": ("reconstruction MSE", ".4f"),
    "reconstruction_mse_scaled": ("reconstruction MSE (scaled)", ".4f"),
    "cluster_accuracy": ("cluster accuracy", ".4f"),
    "nmi": ("NMI", ".4f"),
    "final_loss": ("final loss", ".3f"),
    "weight_redundancy": ("weight redundancy", ".2f"),
    "effective_rank": ("effective rank", ".2f"),
    "max_abs_error": ("max abs error", ".2e"),
    "mean_abs_error": ("mean abs error", ".2e"),
    "correlation": ("correlation", ".12f"),
}


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over seeds (0 for one seed); None when any value is missing."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(
    results: Sequence[dict], by: Sequence[str], metrics: Sequence[str], extra: Sequence[str] = ()
) -> list[dict]:
    """One row per distinct value of the ``by`` keys (in first-seen order): the ``by`` values, ``seeds``,
    each metric's mean over seeds, ``<metric>_std``, and ``per_seed``: metric -> values in seed order
    (the ``extra`` keys there too, without a mean)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        row["seeds"] = [m.get("seed") for m in members]
        for metric in metrics:
            row[metric], row[f"{metric}_std"] = mean_std([m.get(metric) for m in members])
        row["per_seed"] = {k: [m.get(k) for m in members] for k in (*metrics, *extra)}
        rows.append(row)
    return rows


def format_cell(mean: float | None, std: float | None, n: int, fmt: str) -> str:
    """``mean ± std`` (``mean`` alone for one seed; ``n/a`` when missing)."""
    if mean is None:
        return "n/a"
    return f"{mean:{fmt}} ± {std:{fmt}}" if n > 1 and std is not None else f"{mean:{fmt}}"


def markdown_table(rows: Sequence[dict], label_keys: Sequence[str], metrics: Sequence[str]) -> str:
    """A GitHub markdown table: the label columns, then one ``mean ± std`` column per metric."""
    headers = [*label_keys, *(LABELS.get(m, (m, ".4g"))[0] for m in metrics)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        n = len(row.get("seeds") or [None])
        cells = [str(row.get(k, "")) for k in label_keys]
        cells += [format_cell(row.get(m), row.get(f"{m}_std"), n, LABELS.get(m, (m, ".4g"))[1]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(
    folder: Path, header: dict, experiment: str, result: dict, table: str, figures: Sequence[Path],
    notes: str = "", protocol: str = "",
) -> Path:  # fmt: skip
    """``<experiment>.json`` (header + result) and ``<experiment>.md`` (the command, the protocol, the table,
    notes and figures) in ``folder``."""
    from implicit_em.run.report import write_metrics

    result = {"experiment": experiment, **header, **result, "figures": [p.name for p in figures]}
    path = write_metrics(result, folder / f"{experiment}.json")
    seeds = header.get("seeds") or []
    n = len(seeds)
    described = f"{'mean ± std over ' + str(n) + ' seeds' if n > 1 else '1 seed'} ({', '.join(map(str, seeds))})"
    protocol = protocol or (
        f"{header.get('epochs')} epochs, K = {header.get('components')}, batch {header.get('batch_size')}, "
        f"{described}; probe: {header.get('probe_method')}."
    )
    md = [
        f"# {experiment}: {header.get('data')}",
        "",
        *([f"Produced by `{header['command']}`.", ""] if header.get("command") else []),
        protocol.replace("{seeds}", described),
        "",
        table,
        "",
        *([notes, ""] if notes else []),
        *(f"![{p.stem}]({p.name})" for p in figures),
        "",
    ]
    (folder / f"{experiment}.md").write_text("\n".join(md))
    return path
