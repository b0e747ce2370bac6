"""A run's dashboard: the pass, the extras, one record per component, and the files (``scripts/dashboard.py``).

Output folder: ``index.html``, ``component.html``, ``data/`` (index.js, meta.js, blocks/), ``neuronpedia/``
(batch-*.json) and ``summary.json`` (settings, counts, the pass's speed and the peak memory after the pass,
``pass.peak_rss_mb``, and at the end, ``peak_rss_mb_total``: the process's peak resident set).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from implicit_em.errors import ConfigError, DataError
from implicit_em.lm.dashboard import html, neuronpedia
from implicit_em.lm.dashboard.source import LoadedRun, limit_ranges, make_source, stream_pass
from implicit_em.lm.dashboard.stream import ComponentStats, StreamConfig

SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class Settings:
    """What ``scripts/dashboard.py`` reads and keeps (see its --help)."""

    split: str = "all"
    max_rows: int | None = 1_000_000
    batch_rows: int | None = None
    stream: StreamConfig = field(default_factory=StreamConfig)
    block: int = 64
    logit_tokens: int = 10
    near: int = 8
    seed: int = 0
    neuronpedia: bool = True
    #: the first rows of each context left out of the statistics and never chosen (shown in contexts); None:
    #: 1 for a causal LM's activations (its first position carries outlier activations, the attention sink),
    #: else 0
    skip_first: int | None = None

    def __post_init__(self):
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"--max-rows must be >= 1 (got {self.max_rows})")
        if self.block < 1:
            raise ConfigError(f"--block must be >= 1 (got {self.block})")
        if self.skip_first is not None and self.skip_first < 0:
            raise ConfigError(f"--skip-first must be >= 0 (got {self.skip_first})")


@dataclass
class Dashboard:
    """What :func:`build` made: the folder, its meta data, the index rows and a block reader."""

    out: Path
    meta: dict
    rows: list[list]
    summary: dict

    def block(self, first: int) -> dict:
        text = html.block_file(self.out, first).read_text()
        return json.loads(text[len("DASH_BLOCK(") : text.rindex(")")])

    def component(self, j: int) -> tuple[dict, dict]:
        """(its block, its record)."""
        b = self.block(j // self.meta["block"] * self.meta["block"])
        return b, b["components"][j - b["first"]]


def _num(v: float) -> float | None:
    v = float(v)
    return None if not math.isfinite(v) else float(f"{v:.4g}")


def sparkline(counts: np.ndarray, width: int = 16) -> str:
    """The histogram as ``width`` block characters (log scale), up to its last nonzero bin."""
    nz = np.flatnonzero(counts)
    if not len(nz):
        return "—"
    c = counts[: nz[-1] + 1].astype(np.float64)
    if len(c) > width:
        edges = np.linspace(0, len(c), width + 1).round().astype(int)
        c = np.add.reduceat(c, edges[:-1])
    level = np.log1p(c) / np.log1p(c.max())
    return "".join(SPARK[int(round(x * (len(SPARK) - 1)))] if n else " " for x, n in zip(level, c))


class _Contexts:
    """Turns kept items into page records: token ids and labels (text) or pixels (images). :meth:`prefetch`
    reads what a block's items need from the per-row files in one indexed read each."""

    def __init__(self, source):
        self.source = source

    def prefetch(self, items: list[dict]) -> None:
        """Fill in ``_tokens``, ``_label``, ``_doc``, ``_a`` and ``_s`` of text items (one read per file)."""
        if not items or self.source.kind != "text":
            return
        starts = np.array([it["start"] for it in items], dtype=np.int64)
        lengths = np.array([it["length"] for it in items], dtype=np.int64)
        rows = starts + np.array([it["pos"] for it in items], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        tokens = np.asarray(self.source.tokens[index], dtype=np.int64)
        labels = self.source.labels[rows] if self.source.labels is not None else np.full(len(items), -1)
        docs = self.source.doc_ids[rows] if self.source.doc_ids is not None else np.full(len(items), -1)
        values = np.concatenate([it["values"] for it in items]).astype(np.float64)
        scale = np.zeros(len(items))
        nonempty = lengths > 0
        scale[nonempty] = np.maximum.reduceat(np.abs(values), offsets[:-1][nonempty])
        per_value = np.repeat(np.where(scale > 0, scale, 1.0), lengths)
        quantised = np.rint(values / per_value * 1000).astype(np.int64)
        for i, it in enumerate(items):
            lo, hi = offsets[i], offsets[i + 1]
            it["_tokens"], it["_a"] = tokens[lo:hi].tolist(), quantised[lo:hi].tolist()
            it["_s"], it["_label"], it["_doc"] = float(f"{scale[i]:.6g}"), int(labels[i]), int(docs[i])

    def text(self, it: dict) -> dict:
        return {"v": _num(it["value"]), "t": it["_tokens"], "a": it["_a"], "s": it["_s"], "p": it["pos"],
                "lab": it["_label"], "doc": it["_doc"]}  # fmt: skip

    def image(self, it: dict) -> dict:
        px = self.source.raw[it["start"]].double().numpy()
        lo, hi = px.min(), px.max()
        scaled = np.zeros_like(px) if hi <= lo else (px - lo) / (hi - lo) * 255
        labels = self.source.labels
        lab = int(labels[it["start"]]) if labels is not None else -1
        return {"v": _num(it["value"]), "img": np.rint(scaled).astype(int).tolist(), "lab": lab}


def _image_meta(shape: tuple[int, ...]) -> dict:
    if len(shape) == 2:
        return {"h": shape[0], "w": shape[1], "c": 1, "layout": "hw"}
    if len(shape) == 3 and shape[0] in (1, 3):
        return {"h": shape[1], "w": shape[2], "c": shape[0], "layout": "chw"}
    if len(shape) == 3 and shape[-1] in (1, 3):
        return {"h": shape[0], "w": shape[1], "c": shape[-1], "layout": "hwc"}
    raise ConfigError(f"cannot draw images of shape {shape}: 2-D, or 3-D with 1 or 3 channels")


def records(
    stats: ComponentStats, source, weights: np.ndarray, near: tuple[np.ndarray, np.ndarray], logits: dict | None,
    strings, block: int,
) -> Iterator[dict]:  # fmt: skip
    """One block payload ``{first, vocab, labels, components}`` at a time."""
    ctx = _Contexts(source)
    make = ctx.image if source.kind == "image" else ctx.text
    labels = getattr(source, "label_names", None)
    for first in range(0, stats.k, block):
        comps, ids = [], set()
        end = min(stats.k, first + block)
        tops = {j: stats.top[j] for j in range(first, end)}  # made once per block, then dropped
        quants = {j: stats.quantiles[j] for j in range(first, end)}
        ctx.prefetch([it for j in tops for it in tops[j] + [x for g in quants[j] for x in g["items"]]])
        for j in range(first, end):
            active = int(stats.active[j])
            counts = stats.hist_counts[j]
            last = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 0
            c = {
                "i": j, "dens": _num(stats.density[j]), "act": active, "mean": _num(stats.mean[j]),
                "meanAct": _num(stats.total[j] / active) if active else None,
                "max": _num(stats.maximum[j]) if active else None,
                "hist": {"top": _num(stats.hist_top[j]), "bins": int(len(counts)), "counts": counts[:last].tolist()},
                "top": [make(it) for it in tops[j]],
                "quant": [{"lo": _num(g["lo"]), "hi": _num(g["hi"]), "items": [make(it) for it in g["items"]]}
                          for g in quants[j]],
                "near": [[int(i), _num(v)] for i, v in zip(near[0][j], near[1][j])],
                "logits": None,
            }  # fmt: skip
            if source.kind == "image":
                w = weights[j]
                m = float(np.abs(w).max()) or 1.0
                c["wimg"] = np.rint(w / m * 1000).astype(int).tolist()
            else:
                for x in c["top"] + [it for g in c["quant"] for it in g["items"]]:
                    ids.update(x["t"])
            if logits is not None:
                c["logits"] = {
                    "pos": [[int(i), _num(v)] for i, v in zip(logits["pos_ids"][j], logits["pos_values"][j])],
                    "neg": [[int(i), _num(v)] for i, v in zip(logits["neg_ids"][j], logits["neg_values"][j])],
                    "hist": {"edges": [_num(logits["hist_edges"][j][0]), _num(logits["hist_edges"][j][-1])],
                             "counts": logits["hist_counts"][j].tolist()},
                }  # fmt: skip
                ids.update(c["logits"]["pos"][i][0] for i in range(len(c["logits"]["pos"])))
                ids.update(c["logits"]["neg"][i][0] for i in range(len(c["logits"]["neg"])))
            comps.append(c)
        vocab = {}
        if strings is not None and ids:
            ordered = sorted(ids)
            vocab = {str(i): s for i, s in zip(ordered, strings(ordered))}
        if logits is not None:  # logit tokens as strings (the page shows them directly)
            for c in comps:
                for key in ("pos", "neg"):
                    c["logits"][key] = [[vocab.get(str(i), str(i)), v] for i, v in c["logits"][key]]
        yield {"first": first, "vocab": vocab, "labels": labels, "components": comps}


def top_tokens(comp: dict, vocab: dict, n: int = 4) -> str:
    """The distinct tokens at the maxima of a component's top contexts, in order, joined (a token of white space
    shown as ↵, ⇥ and ␣)."""
    seen: list[str] = []
    for x in comp["top"]:
        raw = vocab.get(str(x["t"][x["p"]]), "")
        s = raw.strip() or raw.replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣")  # whitespace, visible
        if s not in seen:
            seen.append(s)
        if len(seen) == n:
            break
    return " · ".join(seen)


def top_labels(comp: dict, labels: list | None, n: int = 3) -> str:
    """The most common labels among a component's top images, with their share."""
    labs = [x["lab"] for x in comp["top"] if x["lab"] >= 0]
    if not labs:
        return ""
    values, counts = np.unique(labs, return_counts=True)
    order = np.argsort(-counts)[:n]

    def name(i: int) -> str:
        return str(labels[i]) if labels and i < len(labels) else str(i)

    return " · ".join(f"{name(int(values[i]))} {counts[i] / len(labs):.0%}" for i in order)


#: what a dashboard folder holds besides its pages: the pass's numbers and the run they are of
SUMMARY = "summary.json"


def check_out(out: str | Path, run_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse, with one line, an ``out`` that is a file, or a folder holding files but no dashboard of the run in
    ``run_dir`` (a run directory or one of its checkpoints), unless ``overwrite``. A dashboard of the same run is
    rebuilt in place; with ``overwrite`` the dashboard's files replace their namesakes and other files stay."""
    from implicit_em.run.rundir import RunDir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; pass a folder as --out")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    try:
        earlier = Path(json.loads((out / SUMMARY).read_text())["run_dir"]).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        earlier = None
    if earlier != RunDir.of(run_dir)[0].path.resolve():
        raise DataError(
            f"{out} is not empty and holds no dashboard of {run_dir}; pass another --out, or --overwrite to write "
            "the dashboard's files there"
        )


def build(
    run_dir: str | Path, out: str | Path, settings: Settings | None = None, log: Callable[[str], None] = lambda s: None,
    run: LoadedRun | None = None, overwrite: bool = False,
) -> Dashboard:  # fmt: skip
    """Write the dashboard of ``run`` (``run_dir`` loaded by :func:`implicit_em.run.app.load_run`) into ``out``
    (refused by :func:`check_out` unless empty, new, a dashboard of the same run, or ``overwrite``); see the module
    docstring."""
    from implicit_em.lm.dashboard import extras

    started = time.perf_counter()
    settings = settings or Settings()
    if run is None:
        raise ValueError("build() needs the loaded run: implicit_em.run.app.load_run(run_dir)")
    check_out(out, run_dir, overwrite)
    source, ranges = make_source(run, settings.split)
    ranges = limit_ranges(ranges, settings.max_rows)
    strings = None
    manifest = source.manifest or {}
    if source.kind == "text":
        strings = extras.TokenStrings(extras.load_tokenizer(manifest))
    skip = settings.skip_first
    if skip is None:
        skip = 1 if source.kind == "text" and manifest.get("model_kind") == "causal_lm" else 0
    config = replace(settings.stream, skip_first=skip)
    stats, timing = stream_pass(run, source, ranges, config, settings.batch_rows, settings.seed, log)
    log(f"dashboard pass: {timing.rows} rows, {timing.contexts} contexts, K {timing.components} in "
        f"{timing.seconds:.1f} s; peak memory {timing.peak_rss_mb:.0f} MB")  # fmt: skip
    weights = run.module.model.component_weights().detach().float().cpu()
    near = extras.nearest_components(weights, settings.near)
    logits, logit_note = None, ""
    kind = manifest.get("model_kind")
    if source.kind == "text" and kind == "causal_lm":
        found = extras.readout_directions(run)
        if found is None:
            logit_note = "no logit effects: the run has no readout.safetensors"
        else:
            directions, where = found
            logits = extras.logit_effects(manifest, directions, settings.logit_tokens)
            logit_note = (f"W_U (g * r_j): r_j from {where} in raw activation units, g the final norm's gain "
                          f"({logits['norm']}), W_U the unembedding")  # fmt: skip
    elif source.kind == "text":
        logit_note = f"no logit effects: the harvested model is {kind or 'not marked'} (not a causal LM)"

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k = stats.k
    unit = "images" if source.kind == "image" else "tokens"
    title = _title(run, manifest)
    meta = {
        "title": title, "k": k, "block": settings.block, "rows": stats.rows, "unit": unit, "kind": source.kind,
        "threshold": settings.stream.threshold, "logit_note": logit_note, "split": settings.split, "skip_first": skip,
        "image": _image_meta(source.image_shape) if source.kind == "image" else None, "standalone": False,
    }  # fmt: skip
    rows: list[list] = []
    np_writer = neuronpedia.BatchWriter(out / "neuronpedia", manifest, run.run_dir) if settings.neuronpedia else None
    for block in records(stats, source, weights.numpy(), near, logits, strings, settings.block):
        html.write_block(out, block)
        for c in block["components"]:
            j = c["i"]
            label = top_labels(c, block["labels"]) if source.kind == "image" else top_tokens(c, block["vocab"])
            rows.append([j, c["dens"], c["meanAct"] or 0.0, c["max"] or 0.0, label,
                         sparkline(stats.hist_counts[j]), int(c["act"] == 0)])  # fmt: skip
        if np_writer is not None:
            np_writer.add(block)
    if np_writer is not None:
        np_writer.close()
    dead = sum(r[6] for r in rows)
    summary = {
        "run_dir": str(run.run_dir.resolve()), "out": str(out.resolve()), "components": k, "dead": dead,
        "rows": stats.rows, "contexts": timing.contexts, "split": settings.split, "pass": timing.as_dict(),
        "settings": {**asdict(settings), "skip_first": skip, "stream": asdict(config)}, "seconds": 0.0,
    }  # fmt: skip
    meta["summary_html"] = _summary_html(meta, summary, manifest)
    html.write_index(out, meta, rows)
    html.write_component_page(out, meta)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["peak_rss_mb_total"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return Dashboard(out, meta, rows, summary)


def _title(run: LoadedRun, manifest: dict) -> str:
    name = "/".join(run.run_dir.resolve().parts[-3:])
    if manifest.get("model"):
        model = "/".join(Path(str(manifest["model"])).parts[-2:])
        return f"{name} · {model} layer {manifest.get('layer')}"
    return f"{name} · {type(run.datamodule).__name__}"


def _plural(n: int, word: str) -> str:
    return word if n == 1 else f"{n} {word}s"


def _summary_html(meta: dict, summary: dict, manifest: dict) -> str:
    p = summary["pass"]
    import html as h

    parts = [
        f"{meta['k']:,} components, {summary['dead']:,} dead (never active)",
        f"{summary['rows']:,} {meta['unit']} in {summary['contexts']:,} contexts ({h.escape(meta['split'])} rows"
        + (f"; the first {_plural(meta['skip_first'], 'token')} of each context left out" if meta["skip_first"] else "")
        + ")",
        f"pass: {p['rows_per_s']:,.0f} rows/s, {p['contexts_per_s']:,.0f} contexts/s, peak memory "
        f"{p['peak_rss_mb']:,.0f} MB",
    ]
    if manifest.get("model_kind"):
        parts.append(h.escape(str(manifest["model_kind"])))
    return " · ".join(parts)
