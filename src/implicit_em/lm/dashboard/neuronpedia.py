"""Neuronpedia-shaped JSON beside the HTML: ``neuronpedia/batch-N.json``, one per block of components.

Each file is ``{"model_id", "layer", "sae_set", "features": [...]}`` with the fields of Neuronpedia's feature
upload that a dashboard fills: ``feature_index``; ``activations`` (each ``{"tokens", "values",
"qualifying_token_index", "maxValue", "maxValueTokenIndex", "bin_min", "bin_max", "bin_contains"}``: the top
contexts with ``bin_min`` -1, as the upload marks them, then the quantile samples with their value range and
the share of the sample in it); ``frac_nonzero`` (density); ``freq_hist_data_bar_heights`` and
``freq_hist_data_bar_values`` (the activation histogram: counts and bin centres, parallel arrays);
``maxActApprox``; ``pos_str``, ``pos_values``, ``neg_str``, ``neg_values`` and ``logits_hist_data_bar_heights``
/ ``_values`` (the logit effects, causal LMs only, else empty); ``topkCosSimIndices`` / ``Values`` (the nearest
components by weight cosine). Values are in the component's own units; tokens are display strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _tokens(x: dict, vocab: dict) -> list[str]:
    return [vocab[t] if t in vocab else str(t) for t in x["t"]]


def _activation(x: dict, vocab: dict, lo: float, hi: float, contains: float) -> dict:
    array = (np.asarray(x["a"], dtype=np.float64) * (x["s"] / 1000)).round(5)
    values = array.tolist()
    top = int(array.argmax()) if len(values) else 0
    return {
        "tokens": _tokens(x, vocab), "values": values, "qualifying_token_index": x["p"],
        "maxValue": values[top] if values else 0.0, "maxValueTokenIndex": top,
        "bin_min": lo, "bin_max": hi, "bin_contains": contains,
    }  # fmt: skip


def neuronpedia_record(c: dict, vocab: dict) -> dict:
    """One component record (see :func:`implicit_em.lm.dashboard.build.records`) as a Neuronpedia feature;
    ``vocab``: token id (int) -> string."""
    acts = []
    if c["top"] and "t" in c["top"][0]:
        acts += [_activation(x, vocab, -1, -1, -1) for x in c["top"]]
        n = sum(len(g["items"]) for g in c["quant"]) or 1
        for g in c["quant"]:
            acts += [_activation(x, vocab, g["lo"], g["hi"], len(g["items"]) / n) for x in g["items"]]
    hist = c["hist"]
    width = (hist["top"] or 0) / hist["bins"]
    logits = c.get("logits") or {}
    lh = logits.get("hist") or {}
    lh_counts = lh.get("counts", [])
    lh_values = []
    if lh_counts:
        lo, hi = lh["edges"]
        step = (hi - lo) / len(lh_counts)
        lh_values = [lo + (i + 0.5) * step for i in range(len(lh_counts))]
    return {
        "feature_index": c["i"], "activations": acts, "frac_nonzero": c["dens"],
        "freq_hist_data_bar_heights": hist["counts"],
        "freq_hist_data_bar_values": [(i + 0.5) * width for i in range(len(hist["counts"]))],
        "maxActApprox": c["max"] or 0.0,
        "pos_str": [s for s, _ in logits.get("pos", [])], "pos_values": [v for _, v in logits.get("pos", [])],
        "neg_str": [s for s, _ in logits.get("neg", [])], "neg_values": [v for _, v in logits.get("neg", [])],
        "logits_hist_data_bar_heights": lh_counts, "logits_hist_data_bar_values": lh_values,
        "topkCosSimIndices": [i for i, _ in c["near"]], "topkCosSimValues": [v for _, v in c["near"]],
    }  # fmt: skip


class BatchWriter:
    """Writes one ``batch-N.json`` per block handed to :meth:`add`."""

    def __init__(self, out: Path, manifest: dict, run_dir: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.head = {
            "model_id": Path(str(manifest.get("model") or "unknown")).name,
            "layer": manifest.get("layer"),
            "sae_set": "implicit-em-" + "-".join(Path(run_dir).resolve().parts[-2:]),
        }
        self.n = 0

    def add(self, block: dict) -> None:
        vocab = {int(i): t for i, t in block["vocab"].items()}
        features = [neuronpedia_record(c, vocab) for c in block["components"]]
        path = self.out / f"batch-{self.n}.json"
        path.write_text(json.dumps({**self.head, "features": features}, separators=(",", ":"), allow_nan=False))
        self.n += 1

    def close(self) -> None:
        pass
