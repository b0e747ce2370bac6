"""The summaries every experiment writes: mean ± std over seeds, markdown tables with column formats, the
results files (``<experiment>.json`` and ``.md``). The figures are :mod:`implicit_em.experiments.plots`."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: column header and number format of each key a table may show (an experiment may pass its own)
FORMATS = {
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
#: what a table shows for a number that is missing (or not finite)
MISSING = "—"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over seeds (0 for one seed); None when any value is missing."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _summary(values: list) -> tuple[Any, Any, bool]:
    """(value, std, has_std) of one key over seeds: numbers -> mean and std (one integer that every seed has, a
    setting or a count, stays as it is, without a std); dicts of numbers (one per k) -> the same per entry;
    anything else (names, paths, curves) -> the first seed's value."""
    if all(_is_number(v) or v is None for v in values) and any(_is_number(v) for v in values):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and len(set(values)) == 1:
            return values[0], 0.0, False
        mean, std = mean_std(values)
        return mean, std, True
    if values and all(isinstance(v, dict) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        parts = {k: _summary([v.get(k) for v in values]) for k in keys}
        if all(has for _, _, has in parts.values()):
            return {k: p[0] for k, p in parts.items()}, {k: p[1] for k, p in parts.items()}, True
    return values[0] if values else None, None, False


def summarize(
    results: Sequence[dict], by: Sequence[str], metrics: Sequence[str] | None = None, extra: Sequence[str] = ()
) -> list[dict]:
    """One row per distinct value of the ``by`` keys (in first-seen order) over each seed's result (a dict with
    ``seed``): the ``by`` values, ``seeds``, each of ``metrics`` (default: every other key of the results) summed
    up over seeds -- a number as its mean and ``<key>_std`` (None when a seed lacks it; an integer every seed
    shares, a setting or a count, as it is, with a std only when named), a dict of numbers (one per k) the same per entry, anything else as
    the first seed's -- and ``per_seed``: each seed's result (``seed``, then the metrics and the ``extra`` keys,
    or all of it when ``metrics`` is None), in seed order."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        row["seeds"] = [m.get("seed") for m in members]
        named = metrics is not None
        keys = list(metrics) if named else [k for k in dict.fromkeys(k for m in members for k in m) if k not in
                                            (*by, "seed")]  # fmt: skip
        for k in keys:
            value, std, has_std = _summary([m.get(k) for m in members])
            row[k] = value
            if has_std or named:  # a named metric always has its std (0 for a shared integer)
                row[f"{k}_std"] = std
        kept = ("seed", *keys, *extra) if named else None
        row["per_seed"] = [m if kept is None else {k: m.get(k) for k in kept} for m in members]
        rows.append(row)
    return rows


def format_cell(mean, std=None, n: int = 1, fmt: str = ".4g") -> str:
    """``mean ± std`` (``mean`` alone for one seed or without a std; :data:`MISSING` when missing; ``[lo, hi]`` for
    an interval); ``fmt`` ``d`` writes an integer."""
    if mean is None or isinstance(mean, bool) or (isinstance(mean, float) and not math.isfinite(mean)):
        return MISSING
    if isinstance(mean, (list, tuple)) and mean and all(_is_number(v) for v in mean):  # an interval
        return "[" + ", ".join(format_cell(v, fmt=fmt) for v in mean) + "]"
    if not _is_number(mean):
        return str(mean)
    text = lambda v: format(int(v) if fmt == "d" else v, fmt)  # noqa: E731
    return f"{text(mean)} ± {text(std)}" if n > 1 and _is_number(std) else text(mean)


def markdown_table(
    rows: Sequence[dict], label_keys: Sequence[str], columns: Sequence[str] | Mapping[str, tuple[str, str]]
) -> str:
    """A GitHub markdown table: the label columns, then one ``mean ± std`` column per key of ``columns`` (a
    mapping key -> (header, format), or keys looked up in :data:`FORMATS`); a dotted key ``name.k`` reads entry
    ``k`` of a dict-valued ``name`` (e.g. ``sparse_probe_accuracy.5``)."""
    columns = columns if isinstance(columns, Mapping) else {c: FORMATS.get(c, (c, ".4g")) for c in columns}
    headers = [*label_keys, *(header for header, _ in columns.values())]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        n = len(row.get("seeds") or [None])
        cells = [str(row.get(k, "")) if row.get(k) is not None else MISSING for k in label_keys]
        cells += [format_cell(*_lookup(row, key), n, fmt) for key, (_, fmt) in columns.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lookup(row: dict, key: str) -> tuple[Any, Any]:
    """(value, std) of ``key`` in a summary row; ``name.k``: entry ``k`` of the dict ``name``."""
    if key in row or "." not in key:
        return row.get(key), row.get(f"{key}_std")
    name, entry = key.split(".", 1)
    return (row.get(name) or {}).get(entry), (row.get(f"{name}_std") or {}).get(entry)


def seeds_described(seeds: Sequence) -> str:
    """``mean ± std over 3 seeds (1, 2, 3)`` or ``1 seed (1)``."""
    n = len(seeds)
    return f"{'mean ± std over ' + str(n) + ' seeds' if n > 1 else '1 seed'} ({', '.join(map(str, seeds))})"


def write_results(
    folder: Path, header: dict, experiment: str, result: dict, table: str, figures: Sequence[Path],
    notes: str = "", protocol: str = "", title: str = "",
) -> Path:  # fmt: skip
    """``<experiment>.json`` (header + result) and ``<experiment>.md`` (the title, the command, the protocol
    (``{seeds}`` in it: :func:`seeds_described`), the table, notes and figures) in ``folder``."""
    from implicit_em.run.report import write_metrics

    result = {"experiment": experiment, **header, **result, "figures": [Path(p).name for p in figures]}
    path = write_metrics(result, Path(folder) / f"{experiment}.json")
    described = seeds_described(header.get("seeds") or [])
    protocol = protocol or (
        f"{header.get('epochs')} epochs, K = {header.get('components')}, batch {header.get('batch_size')}, "
        f"{described}; probe: {header.get('probe_method')}."
    )
    md = [
        title or f"# {experiment}: {header.get('data')}",
        "",
        *([f"Produced by `{header['command']}`.", ""] if header.get("command") else []),
        protocol.replace("{seeds}", described),
        "",
        table,
        "",
        *([notes, ""] if notes else []),
        *(f"![{Path(p).stem}]({Path(p).name})" for p in figures),
        "",
    ]
    (Path(folder) / f"{experiment}.md").write_text("\n".join(md))
    return path
