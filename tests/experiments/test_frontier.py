"""The frontier experiment: every model at each target L0, judged like compare's rows; one small run end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from implicit_em.experiments import EXPERIMENTS, compare, frontier
from implicit_em.experiments.frontier import markdown, plot_metric, probe_mean, run_frontier

REPO = Path(__file__).resolve().parents[2]


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce_script", REPO / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_mean_is_k_1_2_5_only():
    assert probe_mean({"1": 0.6, "2": 0.7, "5": 0.8, "20": 0.1}) == pytest.approx(0.7)
    assert probe_mean({"1": 0.6, "2": float("nan"), "5": 0.8}) is None and probe_mean(None) is None


def test_reproduce_takes_l0_and_refuses_bad_ones():
    reproduce = _reproduce()
    s, experiments = reproduce.settings(["--experiment", "frontier", "--l0", "16", "32", "--components", "64"])
    assert experiments == ["frontier"] and s.l0s == [16, 32] and "frontier" in EXPERIMENTS
    assert reproduce.settings(["--experiment", "compare"])[0].l0s is None
    for bad in (["--l0", "0"], ["--l0", "65", "--components", "64"]):
        with pytest.raises(SystemExit) as e:
            reproduce.settings(["--experiment", "frontier", *bad])
        assert e.value.code == 2


def test_reproduce_passes_lm_windows_model_settings_rows_and_split(monkeypatch):
    reproduce = _reproduce()
    argv = ["--experiment", "frontier", "compare", "--l0", "32", "--components", "64", "--lm-windows", "20",
            "--model-set", "net.distance=softplus", "k=3", "--rows", "implicit_em", "random_encoder", "--split", "val"]  # fmt: skip
    s, _ = reproduce.settings(argv)
    assert s.lm_windows == 20 and s.split == "val" and s.rows == ["implicit_em", "random_encoder"]
    assert s.model_args == ["--model.net.distance", "softplus", "--model.k", "3"]
    seen = {}
    monkeypatch.setattr(frontier, "run_frontier", lambda *a, **kw: seen.setdefault("frontier", kw))
    monkeypatch.setattr(compare, "run_compare", lambda *a, **kw: seen.setdefault("compare", kw))
    frontier.run_frontier_experiment(s)
    compare.run_compare_experiment(s)
    assert seen["frontier"]["lm_windows"] == 20 and seen["frontier"]["split"] == "val"
    assert seen["frontier"]["model_args"] == s.model_args and seen["frontier"]["rows_kept"] == s.rows
    assert seen["frontier"]["wandb_project"] is None and seen["frontier"]["sae_dirs"] == []
    assert seen["compare"]["lm_windows"] == 20 and seen["compare"]["sae_dirs"] == []
    defaults, _ = reproduce.settings(["--experiment", "frontier"])
    assert defaults.lm_windows is None and defaults.lm_tokens == 20480 and defaults.split == "test"
    assert defaults.rows is None and not defaults.model_args
    assert defaults.wandb_project is None
    assert reproduce.settings(["--experiment", "frontier", "--wandb"])[0].wandb_project == "implicit-em"
    assert reproduce.settings(["--experiment", "frontier", "--wandb", "mine"])[0].wandb_project == "mine"
    for bad in (["--lm-windows", "-1"], ["--model-set", "net.distance"], ["--rows", "sae"], ["--split", "train"]):
        with pytest.raises(SystemExit) as e:
            reproduce.settings(["--experiment", "frontier", *bad])
        assert e.value.code == 2


def test_reproduce_passes_saved_sae_folders_to_compare_and_frontier(tmp_path):
    reproduce = _reproduce()
    (tmp_path / "a").mkdir()
    s, _ = reproduce.settings(["--experiment", "compare", "frontier", "--sae", str(tmp_path / "a"), "--seeds", "1"])
    assert s.saes == [str(tmp_path / "a")] and s.seeds == [1]
    assert reproduce.settings(["--experiment", "compare"])[0].saes == []
    for bad in (["--experiment", "compare", "--sae", str(tmp_path / "none")],
                ["--experiment", "ablation", "--sae", str(tmp_path / "a")]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            reproduce.settings(bad)
        assert e.value.code == 2


def test_frontier_keeps_the_rows_asked_for_and_scores_on_val(tmp_path):
    path = run_frontier("digits", tmp_path, components=16, epochs=1, seeds=[1], l0s=[2], configs=REPO / "configs",
                        rows_kept=["implicit_em", "random_encoder"], split="val", lm_windows=0)  # fmt: skip
    result = json.loads(path.read_text())
    assert [r["model"] for r in result["rows"]] == ["implicit_em", "random_encoder"]
    assert all(r["scored_on"] == "val" for r in result["rows"]) and result["split"] == "val"
    assert "scored on val" in (tmp_path / "digits" / "frontier.md").read_text()
    for bad in (["pca"], ["random_encoder", "topk_sae"], ["nope", "implicit_em"]):
        with pytest.raises(ValueError, match="--rows"):
            run_frontier("digits", tmp_path, components=16, l0s=[2], rows_kept=bad)


def test_markdown_and_plot_skip_missing_numbers(tmp_path):
    rows = [
        {"model": "implicit_em", "target_l0": 2, "l0": 2.0, "fvu": 0.5, "ce_loss_recovered": None},
        {"model": "implicit_em", "target_l0": 4, "l0": 4.0, "fvu": 0.4, "ce_loss_recovered": None},
        {"model": "pca", "target_l0": None, "l0": 16.0, "fvu": 0.1},
    ]
    protocol, text, notes = markdown(rows, {"data": "d", "components": 16, "epochs": 1, "seeds": [1], "l0s": [2, 4],
                                            "command": "c"})  # fmt: skip
    assert "target L0 [2, 4]" in protocol and "{seeds}" in protocol and "ridge readout" in notes
    assert "| implicit_em | 2 | 2.0 |" in text and "| pca | — | 16.0 |" in text
    assert plot_metric(rows, "fvu", tmp_path / "fvu.png", "t").is_file()
    assert plot_metric(rows, "ce_loss_recovered", tmp_path / "ce.png", "t") is None
    assert not (tmp_path / "ce.png").exists()


def test_frontier_on_digits_writes_every_row_at_every_l0_in_one_pass(tmp_path, one_pass, sparsify_folder):
    folder, _ = sparsify_folder
    path = run_frontier("digits", tmp_path, components=16, epochs=1, seeds=[1], l0s=[4, 2], configs=REPO / "configs",
                        sae_dirs=[folder])  # fmt: skip
    assert one_pass == ["none"] * 6  # one DataModule set up per trained row, none for the other rows
    result = json.loads(path.read_text())
    assert result["l0s"] == [2, 4]
    rows = result["rows"]
    by = {(r["model"], r["target_l0"]): r for r in rows}
    for k in (2, 4):
        for name in ("implicit_em", "topk_sae", "batchtopk_sae", "random_encoder"):
            r = by[(name, k)]
            assert all(isinstance(r[m], float) and math.isfinite(r[m]) for m in ("fvu", "l0", "dead_fraction")), r
            assert 0 <= r["sparse_probe_mean"] <= 1 and r["train_seconds"] >= 0
        # TopK codes keep at most k per input: ours, the TopK SAE's and the random encoder's
        for name in ("implicit_em", "topk_sae", "random_encoder"):
            assert by[(name, k)]["l0"] <= k + 1e-9
        assert by[("implicit_em", k)]["l0"] > 0.8 * k
        # the SAEs are also judged through their own decoders; the decoder-free rows have none
        assert isinstance(by[("topk_sae", k)]["fvu_decoder"], float) and by[("implicit_em", k)]["fvu_decoder"] is None
        assert by[("implicit_em", k)]["n_parameters"] * 2 < by[("topk_sae", k)]["n_parameters"]
        assert by[("random_encoder", k)]["train_seconds"] == 0.0
        assert isinstance(by[("topk_sae", k)]["train_curve"], list)  # logged every 50 steps: none in 1 digits epoch
    assert by[("kmeans", None)]["l0"] == pytest.approx(1.0) and ("pca", None) in by
    # what the models saw, the full linear probe beside the k-sparse one, parameters counted both ways
    assert result["tokens_trained"] == by[("topk_sae", 2)]["rows_trained"] > 1000
    assert all(0 < r["probe_accuracy"] <= 1 for r in rows)
    ours, sae = by[("implicit_em", 2)], by[("topk_sae", 2)]
    assert ours["parameters_code"] == 16 * 64 + 16 == sae["parameters_code"]
    assert ours["parameters_reconstruction"] == ours["parameters_code"] + 16 * 64 + 64  # its ridge readout
    assert sae["parameters_reconstruction"] == sae["n_parameters"] == ours["parameters_reconstruction"]
    peer = by[("sparsify_peer", 4)]  # a saved SAE at the target L0 of its k, through its own decoder
    assert peer["source"] == "sparsify" and peer["l0"] <= 4 + 1e-9 and isinstance(peer["fvu_decoder"], float)
    md = (tmp_path / "digits" / "frontier.md").read_text()
    assert f"each trained model saw {result['tokens_trained']:,} rows" in md and "| params code |" in md
    folder = tmp_path / "digits"
    assert (folder / "frontier.md").is_file() and (folder / "frontier_fvu.png").is_file()
    assert (folder / "frontier_sparse_probe_mean.png").is_file()


def test_training_curve_and_its_change_from_metrics_csv(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss_step,val/loss\n0,50,2.0,\n0,100,1.0,\n0,100,,0.9\n1,150,0.8,\n1,200,0.79,\n"
    )
    curve = frontier.training_curve(tmp_path)
    assert curve == [[50, 2.0], [100, 1.0], [150, 0.8], [200, 0.79]]
    assert frontier.curve_change(curve) == pytest.approx((0.79 - 0.8) / 0.8)  # the last fifth: steps 170-200
    assert frontier.curve_change(curve[:1]) is None and frontier.training_curve(tmp_path / "none") == []
    rows = [{"model": "topk_sae", "target_l0": 8, "train_curve": curve, "train_curve_change": -0.0125},
            {"model": "implicit_em", "target_l0": 8, "train_curve": [[50, -3.0], [100, -4.0]]}]  # fmt: skip
    lines = frontier.curve_lines(rows)
    assert any("topk_sae k=8: training MSE 2 at step 50, 0.79 at step 200; -1.2%" in line for line in lines)
    assert not any("implicit_em" in line for line in lines)  # its loss is not an MSE
    seeds = [
        {**rows[0], "per_seed": [{"seed": 1, "train_curve_change": -0.0125}, {"seed": 2, "train_curve_change": 0.5}]}
    ]
    assert "; -1.2% / +50.0% over the last fifth of the steps (seed by seed)" in frontier.curve_lines(seeds)[2]
    assert frontier.plot_curves(rows, tmp_path / "curve.png", "t").is_file()
    assert frontier.plot_curves(rows[1:], tmp_path / "none.png", "t") is None


def test_log_frontier_writes_an_offline_wandb_run_with_the_table_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    rows = [{"model": "topk_sae", "target_l0": 8, "l0": 8.0, "fvu": 0.2, "train_curve": [[50, 1.0], [100, 0.5]]}]
    assert frontier.plot_curves(rows, tmp_path / "frontier_train_curve.png", "t") is not None
    where = frontier.log_frontier(rows, {"data": "digits", "components": 16, "command": "c"}, tmp_path, "test")
    assert where is not None and where.name.startswith("offline-run-")
    (table,) = (where / "files").rglob("*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"][:3] == ["model", "target_l0", "l0"] and data["data"][0][:3] == ["topk_sae", 8, 8.0]
    (image,) = (where / "files" / "media" / "images").rglob("*.png")
    assert "frontier_train_curve" in image.name


def test_an_interrupted_frontier_keeps_the_seeds_it_finished(tmp_path, monkeypatch):
    def one_seed(configs, data, folder, components, epochs, seed, *rest):
        if seed == 2:
            raise KeyboardInterrupt  # the run stopped during the second seed
        return [{"model": "implicit_em", "target_l0": 2, "l0": 2.0, "fvu": 0.5, "sparse_probe_mean": 0.7}]

    monkeypatch.setattr(frontier, "frontier_seed", one_seed)
    with pytest.raises(KeyboardInterrupt):
        run_frontier("digits", tmp_path, components=16, seeds=[1, 2, 3], l0s=[2], configs=REPO / "configs")
    result = json.loads((tmp_path / "digits" / "frontier.json").read_text())
    assert result["seeds"] == [1] and result["seeds_asked"] == [1, 2, 3]
    assert result["rows"][0]["fvu"] == 0.5 and (tmp_path / "digits" / "frontier_fvu.png").is_file()
    assert "seeds [1]" in (tmp_path / "digits" / "frontier.md").read_text()


@pytest.fixture
def no_figures(monkeypatch):
    """The frontier's PNGs are not drawn (matplotlib's seconds): for the tests that read only its JSON and
    Markdown; the figures themselves: the interrupted run's test and test_markdown_and_plot_skip_missing_numbers."""
    monkeypatch.setattr(frontier, "plot_metric", lambda *a, **k: None)
    monkeypatch.setattr(frontier, "plot_curves", lambda *a, **k: None)


def _fake_seed(calls):
    def one_seed(configs, data, folder, components, epochs, seed, *rest):
        calls.append(seed)
        return [{"model": "implicit_em", "target_l0": 2, "l0": 2.0, "fvu": 0.1 * seed, "sparse_probe_mean": 0.7},
                {"model": "pca", "target_l0": None, "l0": 16.0, "fvu": 0.0, "sparse_probe_mean": 0.6}]  # fmt: skip

    return one_seed


def test_a_frontier_run_again_with_more_seeds_goes_on_from_the_seeds_it_finished(tmp_path, monkeypatch, no_figures):
    calls: list[int] = []
    monkeypatch.setattr(frontier, "frontier_seed", _fake_seed(calls))
    kw = {"components": 16, "l0s": [2], "configs": REPO / "configs", "rows_kept": ["implicit_em", "pca"]}
    run_frontier("digits", tmp_path, seeds=[1], **kw)
    path = run_frontier("digits", tmp_path, seeds=[1, 2, 3], **kw)
    assert calls == [1, 2, 3][:1] + [2, 3]  # seed 1 ran once
    result = json.loads(path.read_text())
    assert result["seeds"] == [1, 2, 3] and result["rows"][0]["fvu"] == pytest.approx(0.2)
    assert [r["seed"] for r in result["rows"][0]["per_seed"]] == [1, 2, 3]
    text = (tmp_path / "digits" / "frontier.md").read_text()  # each seed's numbers beside the means
    assert (
        "Seed by seed (seeds 1 / 2 / 3)" in text
        and "| implicit_em | 2 | 2.0 / 2.0 / 2.0 | — / — / — | 0.100 / 0.200 / 0.300 |" in text
    )
    calls.clear()
    run_frontier("digits", tmp_path, seeds=[1, 2, 3, 4], **kw)  # from a file with several seeds
    result = json.loads(path.read_text())
    assert calls == [4] and result["rows"][0]["fvu"] == pytest.approx(0.25)
    assert [r["fvu"] for r in result["rows"][0]["per_seed"]] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_a_frontier_with_other_settings_or_seeds_is_refused_and_left_as_it_is(tmp_path, monkeypatch, no_figures):
    calls: list[int] = []
    monkeypatch.setattr(frontier, "frontier_seed", _fake_seed(calls))
    kw = {"components": 16, "l0s": [2], "configs": REPO / "configs", "rows_kept": ["implicit_em", "pca"]}
    path = run_frontier("digits", tmp_path, seeds=[1, 2], **kw)
    before = {f.name: f.read_bytes() for f in path.parent.iterdir() if f.is_file()}
    calls.clear()
    for other in ({"epochs": 2}, {"l0s": [4]}, {"model_args": ["--model.net.lambda_aux", "1"]},
                  {"rows_kept": ["implicit_em"]}):  # fmt: skip
        with pytest.raises(ValueError, match="other settings.*pass another --out"):
            run_frontier("digits", tmp_path, seeds=[1, 2, 3], **{**kw, **other})
    with pytest.raises(ValueError, match=r"seeds \[1\] this run was not asked for"):
        run_frontier("digits", tmp_path, seeds=[2, 3], **kw)
    assert calls == [] and {f.name: f.read_bytes() for f in path.parent.iterdir() if f.is_file()} == before
    legacy = json.loads(path.read_text())
    del legacy["rows_kept"]  # a file written before rows_kept was recorded: read as keeping the rows it holds
    path.write_text(json.dumps(legacy))
    run_frontier("digits", tmp_path, seeds=[1, 2, 3], **kw)
    assert calls == [3]
