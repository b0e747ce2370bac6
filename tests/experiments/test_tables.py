"""The one summary every experiment writes: mean ± std over seeds, markdown tables, the results files."""

from __future__ import annotations

import json
import math

import pytest

from implicit_em.experiments.tables import format_cell, markdown_table, mean_std, summarize, write_results


def test_named_metrics_get_a_mean_a_std_and_each_seeds_value():
    results = [
        {"config": "a", "seed": 1, "x": 1.0, "curve": [1]},
        {"config": "b", "seed": 1, "x": 5.0, "curve": [2]},
        {"config": "a", "seed": 2, "x": 3.0, "curve": [3]},
    ]
    rows = summarize(results, ["config"], ["x"], extra=("curve",))
    assert [r["config"] for r in rows] == ["a", "b"]
    assert rows[0]["x"] == 2.0 and rows[0]["x_std"] == pytest.approx(2**0.5) and rows[0]["seeds"] == [1, 2]
    assert rows[0]["per_seed"] == [{"seed": 1, "x": 1.0, "curve": [1]}, {"seed": 2, "x": 3.0, "curve": [3]}]
    assert rows[1]["x_std"] == 0.0 and "curve" not in rows[0]  # extra keys: seed by seed only
    missing = summarize([{"k": 0, "seed": 1, "x": None}, {"k": 0, "seed": 2, "x": 1.0}], ["k"], ["x"])[0]
    assert missing["x"] is None and missing["x_std"] is None


def test_every_key_is_summed_up_by_its_kind_when_no_metrics_are_named():
    a = {"model": "m", "seed": 1, "components": 8, "k": 3, "fvu": 0.2, "sparse_probe_accuracy": {"1": 0.6},
         "run_dir": "r1", "train_curve": [[1, 2.0]], "note": "same", "flag": True, "ce": float("nan")}  # fmt: skip
    b = {**a, "seed": 2, "k": 4, "fvu": 0.4, "sparse_probe_accuracy": {"1": 0.8}, "run_dir": "r2"}
    (row,) = summarize([a, b], ["model"])
    assert row["model"] == "m" and row["seeds"] == [1, 2]
    assert row["components"] == 8 and "components_std" not in row  # an integer every seed shares: a setting
    assert row["k"] == 3.5 and row["k_std"] == pytest.approx(0.5**0.5)  # integers that differ: a mean
    assert row["fvu"] == pytest.approx(0.3) and row["fvu_std"] == pytest.approx(0.02**0.5)
    assert row["sparse_probe_accuracy"] == {"1": pytest.approx(0.7)}
    assert row["sparse_probe_accuracy_std"]["1"] == pytest.approx(0.02**0.5)
    assert row["run_dir"] == "r1" and row["train_curve"] == [[1, 2.0]] and row["flag"] is True  # the first seed's
    assert row["ce"] is None  # not finite in a seed: no mean
    assert row["per_seed"] == [a, b]  # each seed's whole row


def test_mean_std_and_cells():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5)) and mean_std([2.0]) == (2.0, 0.0)
    assert mean_std([1.0, None]) == (None, None) and mean_std([math.inf]) == (None, None)
    assert format_cell(0.5, 0.1, 3, ".2f") == "0.50 ± 0.10" and format_cell(0.5, 0.1, 1, ".2f") == "0.50"
    assert format_cell(None) == "—" and format_cell(float("nan"), fmt=".2f") == "—" and format_cell(7.0, fmt="d") == "7"


def test_markdown_table_with_column_formats_and_dotted_keys():
    rows = summarize([{"model": "a", "seed": s, "fvu": 0.1 * s, "sparse_probe_accuracy": {"5": 0.5 + 0.1 * s},
                       "target_l0": None} for s in (1, 2)], ["model"])  # fmt: skip
    text = markdown_table(
        rows, ["model", "target_l0"], {"fvu": ("FVU", ".2f"), "sparse_probe_accuracy.5": ("k=5", ".2f")}
    )
    lines = text.splitlines()
    assert lines[0] == "| model | target_l0 | FVU | k=5 |" and lines[1] == "|---|---|---|---|"
    assert lines[2] == "| a | — | 0.15 ± 0.07 | 0.65 ± 0.07 |"
    assert markdown_table(rows, ["model"], ["probe_accuracy"]).splitlines()[0] == "| model | probe accuracy |"


def test_write_results_writes_the_json_and_the_markdown(tmp_path):
    header = {"data": "digits", "epochs": 1, "components": 4, "batch_size": 8, "seeds": [1, 2], "probe_method": "torch",
              "command": "python scripts/reproduce.py"}  # fmt: skip
    (tmp_path / "fig.png").write_bytes(b"png")
    path = write_results(tmp_path, header, "demo", {"rows": [{"x": float("nan")}]}, "| t |", [tmp_path / "fig.png"],
                         notes="a note", protocol="done over {seeds}.")  # fmt: skip
    result = json.loads(path.read_text())
    assert result["experiment"] == "demo" and result["figures"] == ["fig.png"] and result["rows"] == [{"x": None}]
    md = (tmp_path / "demo.md").read_text()
    assert md.startswith("# demo: digits\n") and "Produced by `python scripts/reproduce.py`." in md
    assert "done over mean ± std over 2 seeds (1, 2)." in md and "| t |" in md and "a note" in md
    assert "![fig](fig.png)" in md
