"""The paper's experiments: the theorem exactly, and the trained ones judged from the fits themselves."""

from __future__ import annotations

import json

import torch

from implicit_em.experiments.paper import (
    THEOREM_SHAPE,
    identity_errors,
    member_weights,
    random_distances,
    raw_input_probe,
    run_components,
    run_theorem,
)
from implicit_em.experiments.runs import Runs, Settings
from tests.experiments.conftest import REPO


def test_identity_is_exact_in_float64():
    out = identity_errors(random_distances(0))
    assert out["max_abs_error"] < 1e-15 and out["correlation"] > 1 - 1e-12
    assert out["gradient"].shape == THEOREM_SHAPE


def test_theorem_writes_the_worst_case_over_seeds(tmp_path):
    s = Settings(REPO / "configs", out=tmp_path, seeds=[1, 2])
    result = json.loads(run_theorem(s, Runs(s)).read_text())
    (row,) = result["rows"]
    assert [p["seed"] for p in row["per_seed"]] == [1, 2] and row["seeds"] == [1, 2]
    assert result["max_abs_error"] == max(p["max_abs_error"] for p in row["per_seed"]) < 1e-12
    assert "± " in (tmp_path / "digits" / "theorem.md").read_text()  # two seeds: mean ± std


def test_components_and_the_raw_probe_come_from_the_fits_themselves(tmp_path, one_pass):
    s = Settings(REPO / "configs", out=tmp_path, epochs=1, seeds=[1], components=8, probe_method="torch")
    runs = Runs(s, log=lambda line: None)
    result = json.loads(run_components(s, runs).read_text())
    ours = runs.model("implicit_em")
    weights = member_weights(ours, "linear.weight")
    assert weights.shape == (8, 64) and result["image_shape"] == [8, 8]
    assert torch.equal(weights, ours.module.members[0].model.linear.weight.detach())  # the trained weights
    raw = raw_input_probe(s, runs)
    assert 0.5 < raw["probe_accuracy"] <= 1 and raw["n_parameters"] == 0
    assert len(one_pass) == 2  # one DataModule per fit (ours, the SAE), none set up again for the raw probe
    assert (tmp_path / "digits" / "components.png").is_file()
