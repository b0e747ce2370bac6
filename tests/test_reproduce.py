"""scripts/reproduce.py: the --quick run writes every result, the notebook executes on it, bad arguments fail fast."""

from __future__ import annotations

import json
import runpy
import time

import pytest

from implicit_em.experiments import PAPER, expand_experiments
from tests.conftest import REPO, call_in_process, run_script

REPRODUCE = REPO / "scripts" / "reproduce.py"
QUICK = runpy.run_path(str(REPRODUCE))["QUICK"]  # the --quick settings
NOTEBOOK = REPO / "notebooks" / "reproduce.ipynb"
K, D = 64, 64  # the quick run: the default K on 8 x 8 digits

#: experiment -> (top-level JSON keys, keys of every row, figures)
EXPECTED = {
    "theorem": (
        {"max_abs_error", "mean_abs_error", "correlation", "per_seed", "shape"},
        {"max_abs_error", "mean_abs_error", "correlation"},
        {"theorem.png"},
    ),
    "ablation": (
        {"components", "rows"},
        {"config", "dead_components", "redundancy", "responsibility_entropy", "probe_accuracy", "per_seed"},
        {"ablation.png"},
    ),
    "benchmark": (
        {"components", "rows"},
        {"model", "seeds", "per_seed"},
        {"benchmark.png"},
    ),
    "components": (
        {"image_shape", "rows"},
        {"model", "weight_redundancy", "effective_rank"},
        {"components.png", "components_implicit_em.png", "components_sae.png"},
    ),
    "dynamics": (
        {"rows"},
        {"optimizer", "lr", "final_loss", "probe_accuracy", "per_seed"},
        {"dynamics.png"},
    ),
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run (all experiments, digits, 5 epochs, seed 1) shared by the tests below: the script's
    ``main`` in this process (its real process: test_bad_argument_in_a_real_run_is_one_line_and_exit_2)."""
    out = tmp_path_factory.mktemp("reproduce")
    start = time.perf_counter()
    main = runpy.run_path(str(REPRODUCE))["main"]
    run = call_in_process(main, ["--quick", "--out", out], env={"MPLBACKEND": "Agg"})  # main sets it
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"--quick took {time.perf_counter() - start:.0f} s")
    return out / "digits"


def load(folder, experiment: str) -> dict:
    return json.loads((folder / f"{experiment}.json").read_text())


@pytest.mark.parametrize("experiment", PAPER)
def test_quick_run_writes_json_markdown_and_figures(quick, experiment):
    top, row_keys, figures = EXPECTED[experiment]
    result = load(quick, experiment)
    assert top <= set(result), top - set(result)
    assert result["experiment"] == experiment and result["data"] == "digits"
    assert result["epochs"] == QUICK["epochs"] and result["seeds"] == [1] and result["components"] == K
    for row in result["rows"]:
        assert row_keys <= set(row), (row_keys - set(row), row)
    assert set(result["figures"]) == figures
    for name in figures:
        png = quick / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (quick / f"{experiment}.md").read_text()
    assert "Produced by `python scripts/reproduce.py --quick" in md
    assert md.count("\n|") >= 2 + len(result["rows"]), md  # header, rule, one line per row


def test_quick_numbers_follow_the_protocol(quick):
    theorem = load(quick, "theorem")
    assert theorem["max_abs_error"] < 1e-12 and theorem["correlation"] > 1 - 1e-12
    assert theorem["shape"] == [64, 128]

    ablation = load(quick, "ablation")
    rows = {r["config"]: r for r in ablation["rows"]}
    assert list(rows) == ["lse", "lse+var", "lse+var+tc", "var+tc"]  # configs/experiment/ablation.yaml
    assert rows["lse"]["dead_components"] == K  # LSE alone collapses at once
    assert rows["lse+var"]["lambda_tc"] == 0 and rows["var+tc"]["lambda_lse"] == 0
    assert all([s["probe_accuracy"] for s in r["per_seed"]] == [r["probe_accuracy"]] for r in rows.values())

    rows = load(quick, "benchmark")["rows"]
    assert [(r["model"], r["start"]) for r in rows] == [
        ("implicit_em", "data"), ("sae", "data"), ("implicit_em", "paper"), ("sae", "paper"),
        ("kmeans", ""), ("raw_inputs", ""),
    ]  # fmt: skip
    bench = {r["model"]: r for r in rows if r["start"] != "paper"}
    assert 0.5 < bench["raw_inputs"]["probe_accuracy"] <= 1
    assert bench["implicit_em"]["n_parameters"] == K * D + K
    assert bench["sae"]["n_parameters"] == 2 * K * D + K + D  # matched K, plus the decoder
    for model in ("implicit_em", "sae"):
        for key in ("probe_accuracy", "l0_density", "reconstruction_mse", "reconstruction_mse_scaled"):
            assert bench[model][key] is not None, (model, key)
    for model in ("implicit_em", "kmeans"):
        assert 0 < bench[model]["cluster_accuracy"] <= 1 and 0 <= bench[model]["nmi"] <= 1

    dynamics = load(quick, "dynamics")["rows"]
    assert [(r["optimizer"], r["lr"]) for r in dynamics] == [
        (opt, lr) for opt in ("sgd", "adam") for lr in (1e-4, 1e-3, 1e-2, 1e-1)
    ]
    for row in dynamics:
        (curve,) = [s["loss_curve"] for s in row["per_seed"]]
        assert len(curve) == QUICK["epochs"] and curve[-1] == pytest.approx(row["final_loss"], rel=1e-5)

    assert load(quick, "components")["image_shape"] == [8, 8]
    runs = quick / "runs"
    assert {p.name for p in runs.iterdir()} == {
        "ablation", "implicit_em", "sae", "implicit_em_paper_start", "sae_paper_start", "dynamics"
    }  # fmt: skip
    assert all(any(p.glob("**/metrics.json")) for p in runs.iterdir())


def test_notebook_executes_on_the_quick_results(quick, monkeypatch):
    import nbclient  # the dev extra
    import nbformat

    monkeypatch.setenv("IEM_RESULTS", str(quick))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    text = "\n".join(
        str(out.get("text", "")) + str(out.get("data", {}).get("text/markdown", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert str(quick) in text and "| lse+var+tc |" in text and "| kmeans |" in text
    images = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert images == 7  # every figure of every experiment


def test_every_registered_experiment_resolves_and_naming_them_imports_no_lightning():
    import subprocess
    import sys

    from implicit_em.experiments import EXPERIMENTS, runner
    from implicit_em.experiments.frontier import run_frontier_experiment

    assert all(callable(runner(name)) for name in EXPERIMENTS) and runner("frontier") is run_frontier_experiment
    probe = "import sys, implicit_em.experiments; print(sorted(m for m in sys.modules if m.startswith('lightning')))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "[]"  # a bad argument of reproduce.py is answered before any of it loads


def test_bad_argument_in_a_real_run_is_one_line_and_exit_2():
    run = run_script(REPRODUCE, "--experiment", "theorem", "nonsense", timeout=120)
    assert run.returncode == 2
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--experiment" in lines[0] and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "args, key",
    [
        (["--data", "imagenet"], "--data"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "two"], "--epochs"),
        (["--seeds", "1", "1"], "--seeds"),
        (["--seeds"], "--seeds"),
        (["--components", "1"], "--components"),
        (["--probe-method", "svm"], "--probe-method"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_arguments_fail_with_one_line(args, key, capsys):
    main = runpy.run_path(str(REPRODUCE))["main"]
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", "/nonexistent/never-written"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0], err


def test_settings_errors_inside_a_run_are_one_line_and_exit_2(tmp_path, capsys):
    main = runpy.run_path(str(REPRODUCE))["main"]
    code = main(
        ["--experiment", "ablation", "--epochs", "1", "--seeds", "1", "--batch-size", "5000", "--out", str(tmp_path)]
    )
    assert code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "data.batch_size" in lines[0]
    assert not (tmp_path / "digits" / "ablation.json").exists()


def test_expand_experiments_keeps_the_registry_order():
    assert expand_experiments(["dynamics", "theorem", "dynamics"]) == ["theorem", "dynamics"]
    assert expand_experiments(["all"]) == list(PAPER)
    assert expand_experiments(["all", "compare"]) == [*PAPER, "compare"]
