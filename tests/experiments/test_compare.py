"""The compare experiment: its baselines' features, its summary, and one small run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from implicit_em.data.memory import Split
from implicit_em.experiments.compare import (
    ROWS,
    Data,
    Row,
    evaluate_row,
    kmeans_row,
    markdown,
    pca_row,
    run_compare,
    summarize,
)

REPO = Path(__file__).resolve().parents[2]


def _data(n: int = 300, d: int = 5) -> Data:
    g = torch.Generator().manual_seed(0)
    splits = {}
    for name, rows in (("train", n), ("val", n // 3), ("test", n // 3)):
        y = torch.randint(0, 3, (rows,), generator=g)
        x = torch.randn(rows, d, generator=g) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1])[:d] + 3 * y.unsqueeze(1)
        splits[name] = Split(x, y)
    return Data(splits, None)


def test_pca_features_are_centred_projections_in_order_of_variance():
    data = _data()
    f = pca_row(data, 3).features(data)
    assert f["train"].shape == (300, 3)
    assert f["train"].mean(0).abs().max() < 1e-4  # centred on the training mean
    var = f["train"].var(0)
    assert (var[:-1] >= var[1:]).all()
    full = evaluate_row(pca_row(data, 5), data, "torch")  # all of D: a perfect readout
    assert full["fvu"] < 1e-8


def test_kmeans_features_are_one_hot():
    row = kmeans_row(_data(), 4, seed=0)
    f = row.features(_data())
    assert f["test"].shape == (100, 4) and torch.equal(f["test"].sum(1), torch.ones(100))
    assert evaluate_row(row, _data(), "torch")["l0"] == pytest.approx(1.0)


def test_raw_rows_have_probes_only():
    data = _data()
    row = evaluate_row(Row(lambda x: x), data, "torch", probes_only=True)
    assert row["fvu"] is None and row["l0"] is None
    assert set(row["sparse_probe_accuracy"]) == {"1", "2", "5", "20"} and row["probe_accuracy"] > 0.5


def test_summarize_means_over_seeds():
    a = [{"model": "m", "components": 8, "fvu": 0.2, "sparse_probe_accuracy": {"1": 0.6}, "run_dir": "r1"}]
    b = [{"model": "m", "components": 8, "fvu": 0.4, "sparse_probe_accuracy": {"1": 0.8}, "run_dir": "r2"}]
    (row,) = summarize([a, b], [1, 2])
    assert row["model"] == "m" and row["components"] == 8
    assert row["fvu"] == pytest.approx(0.3) and row["sparse_probe_accuracy"]["1"] == pytest.approx(0.7)
    assert [r["seed"] for r in row["per_seed"]] == [1, 2]
    assert "per_seed" not in summarize([a], [1])[0]


def test_markdown_marks_missing_numbers():
    rows = [{"model": "raw", "components": 5, "fvu": None, "probe_accuracy": 0.9, "sparse_probe_accuracy": {"1": 0.7}}]
    text = markdown(rows, {"data": "d", "components": 5, "epochs": 1, "seeds": [1], "command": "cmd"})
    assert "| raw | 5 |" in text and "—" in text and "0.700" in text and "`cmd`" in text


def test_compare_on_digits_writes_every_row(tmp_path):
    path = run_compare("digits", tmp_path, components=16, epochs=1, seeds=[1], configs=REPO / "configs", log=print)
    result = json.loads(path.read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == list(ROWS)
    for name in ROWS[:-1]:  # every row but the raw inputs is scored
        r = rows[name]
        assert all(isinstance(r[m], float) and math.isfinite(r[m]) for m in ("fvu", "l0", "cosine")), r
        assert set(r["sparse_probe_accuracy"]) == {"1", "2", "5", "20"} and r["seconds"] >= 0
    assert rows["topk_sae_l0"]["k"] == max(1, round(rows["implicit_em"]["l0"]))
    assert rows["topk_sae_32"]["k"] == 16 and rows["topk_sae_32"]["l0"] <= 16
    assert rows["pca"]["components"] == 16 and rows["raw"]["fvu"] is None
    assert (tmp_path / "digits" / "compare.md").is_file() and (tmp_path / "digits" / "compare.png").is_file()
