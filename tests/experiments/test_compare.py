"""The compare experiment: one small run end to end, every row judged once, nothing read back."""

from __future__ import annotations

import json
import math

import pytest
import torch

from implicit_em.experiments.compare import ROWS, run_compare, table
from tests.experiments.conftest import REPO


def test_table_marks_missing_numbers_and_shows_each_sparse_k():
    rows = [{"model": "raw", "components": 5, "fvu": None, "probe_accuracy": 0.9, "sparse_probe_accuracy": {"1": 0.7},
             "seeds": [1]}]  # fmt: skip
    text = table(rows)
    assert "| raw | 5 | — |" in text and "| 0.900 |" in text and "| 0.700 |" in text and "sparse k=20" in text


def test_compare_on_digits_writes_every_row_in_one_pass(tmp_path, one_pass, sparsify_folder, capsys):
    folder, coder = sparsify_folder
    path = run_compare("digits", tmp_path, components=16, epochs=1, seeds=[1], configs=REPO / "configs", log=print,
                       sae_dirs=[folder])  # fmt: skip
    result = json.loads(path.read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == [*ROWS, "sparsify_peer"]
    for name in ROWS[:-1]:  # every row but the raw inputs is scored
        r = rows[name]
        assert all(isinstance(r[m], float) and math.isfinite(r[m]) for m in ("fvu", "l0", "cosine")), r
        assert set(r["sparse_probe_accuracy"]) == {"1", "2", "5", "20"} and r["seconds"] >= 0
        assert r["per_seed"][0]["seed"] == 1 and r["per_seed"][0]["fvu"] == r["fvu"]
    assert rows["topk_sae_l0"]["k"] == max(1, round(rows["implicit_em"]["l0"]))
    assert rows["topk_sae_32"]["k"] == 16 and rows["topk_sae_32"]["l0"] <= 16
    assert rows["pca"]["components"] == 16 and rows["raw"]["fvu"] is None
    # the SAEs' own decoders are judged too, the decoder-free rows have none
    assert isinstance(rows["topk_sae_32"]["fvu_decoder"], float) and "fvu_decoder" not in rows["implicit_em"]
    # each trained row is its own fit's numbers: its run's metrics.json says the same
    for name in ("implicit_em", "sae", "topk_sae_32"):
        written = json.loads((tmp_path / rows[name]["run_dir"] / "metrics.json").read_text())
        assert written["fvu"] == rows[name]["fvu"] and written["probe_accuracy"] == rows[name]["probe_accuracy"]
    assert one_pass == ["none"] * 5  # one DataModule set up per trained row, none for the other rows
    assert result["tokens_trained"] == rows["implicit_em"]["rows_trained"] > 1000  # digits' training rows x 1 epoch
    assert (
        result["saes"] == [str(folder)] and "each trained model saw" in (tmp_path / "digits" / "compare.md").read_text()
    )
    # the saved SAE: judged through its own decoder, its L0 its k, its FVU as sparsify computes it
    peer = rows["sparsify_peer"]
    assert peer["k"] == 4 and peer["source"] == "sparsify" and peer["components"] == 32
    assert 3.5 < peer["l0"] <= 4 + 1e-9 and isinstance(peer["fvu"], float)
    from implicit_em.run.app import configure

    dm = configure(["--config", str(REPO / "configs" / "data" / "digits.yaml")], [REPO / "configs" / "default.yaml"])
    dm = dm.datamodule
    dm.setup("fit")  # digits are not normalised: the test rows are the raw activations sparsify reads
    with torch.no_grad():
        expected = float(coder(dm.splits["test"].x).fvu)
    assert peer["fvu_decoder"] == pytest.approx(expected, rel=1e-4)
    assert peer["parameters_code"] == 32 * 64 + 32 and peer["parameters_reconstruction"] == 2 * 32 * 64 + 32 + 64
    folder = tmp_path / "digits"
    assert (folder / "compare.md").is_file() and (folder / "compare.png").is_file()
    assert "![compare](compare.png)" in (folder / "compare.md").read_text()
    assert capsys.readouterr().out.count("compare.json") == 0  # reproduce.py prints where it wrote, once
