"""The patches experiment end to end on small pickled CIFAR-10 batches: both dictionaries, every encoding,
the probe's C chosen on the held-out images, the table and the filter picture."""

import json

import yaml

from implicit_em.eval.coates import MIXTURE_ENCODINGS
from implicit_em.experiments.patches import PROBE_C, decorrelation_weight, run_patches
from tests.data.conftest import write_cifar_batches


def test_both_dictionaries_side_by_side_from_the_fit_itself(tmp_path, monkeypatch, one_pass):
    monkeypatch.setenv("IEM_CACHE_DIR", str(tmp_path / "cache"))
    write_cifar_batches(tmp_path / "c" / "cifar-10-batches-py", n_per_batch=20)
    messages = []
    path = run_patches(
        str(tmp_path / "c"), 4, [3], tmp_path / "out", epochs=1, log=messages.append,
        encodings=MIXTURE_ENCODINGS, extra_args=["--data.n_patches", "2000", "--data.n_eval", "200"],
    )  # fmt: skip
    result = json.loads(path.read_text())
    rows = {(r["model"], r["encoding"]): r for r in result["rows"]}
    assert set(rows) == {("implicit_em", e) for e in MIXTURE_ENCODINGS} | {("kmeans", "triangle")}
    for r in rows.values():
        assert r["components"] == 4 and r["seeds"] == [3] and 0 <= r["probe_accuracy"] <= 1 and r["seconds"] > 0
        assert r["per_seed"][0]["seed"] == 3 and r["per_seed"][0]["probe_accuracy"] == r["probe_accuracy"]
        assert 0 <= r["dead_components"] <= 4
        assert 0 <= r["probe_accuracy_tuned"] <= 1
        held_out = r["validation_accuracy"]
        assert set(held_out) == {str(c) for c in PROBE_C} and held_out[str(r["probe_c"])] == max(held_out.values())
    assert result["probe_split"] == "test images" and result["epochs"] == 1
    folder = tmp_path / "out" / "cifar10"
    md = (folder / "patches.md").read_text()
    assert "| kmeans | triangle | 4 |" in md and "1 seed (3)" in md and "![patches_filters](patches_filters.png)" in md
    assert (folder / "patches_filters.png").stat().st_size > 1000
    assert any("k-means" in m for m in messages)
    assert result["train_args"][result["train_args"].index("--model.net.lambda_tc") + 1] == "1.0"
    saved = yaml.safe_load(next((folder / "runs").rglob("config.yaml")).read_text())  # the README's settings
    assert (
        saved["data"]["init_args"]["batch_size"] == 64
        and saved["model"]["init_args"]["net"]["init_args"]["lambda_lse"] == 4.0
    )


def test_the_decorrelation_weight_keeps_its_pull_per_component_above_400():
    assert decorrelation_weight(64) == decorrelation_weight(400) == 1.0
    assert decorrelation_weight(1600) == 0.25
