"""The end of a sweep: the table of all trials, the plots, the best trial and its command."""

from __future__ import annotations

import csv

import pytest

optuna = pytest.importorskip("optuna", reason="sweeps need the optional extra: pip install 'implicit-em[sweep]'")

from optuna.distributions import FloatDistribution  # noqa: E402
from optuna.trial import TrialState, create_trial  # noqa: E402

from implicit_em.sweep.summary import describe, save_plots, write_table  # noqa: E402


def study_of(values, direction="maximize", second: bool = False) -> optuna.Study:
    """A study of the given values (None: a FAIL trial) over lambda_tc, and lambda_var too with ``second``."""
    study = optuna.create_study(study_name="s", direction=direction)
    dist = {"model.net.lambda_tc": FloatDistribution(0.1, 10, log=True)}
    if second:
        dist["model.net.lambda_var"] = FloatDistribution(0.1, 10)
    for i, v in enumerate(values):
        state = TrialState.COMPLETE if v is not None else TrialState.FAIL
        params = {"model.net.lambda_tc": 0.1 * (i + 1), "model.net.lambda_var": 5.0 - i}
        study.add_trial(create_trial(
            state=state, value=v, params={k: params[k] for k in dist}, distributions=dist,
            user_attrs={"run_dir": f"/runs/s/trial_{i:04d}", "command": f"python scripts/train.py --i {i}"},
            intermediate_values={0: 0.1, 1: 0.2},
        ))  # fmt: skip
    return study


@pytest.mark.parametrize("direction, best", [("maximize", 2), ("minimize", 0)])
def test_the_table_lists_every_trial_best_first_in_markdown(tmp_path, direction, best):
    study = study_of([0.5, None, 0.9, 0.7], direction)
    out = write_table(study, "val_probe_accuracy", tmp_path)
    rows = list(csv.DictReader(out.csv.open()))
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"] and rows[1]["state"] == "FAIL"
    assert rows[2]["model.net.lambda_tc"] == repr(0.1 * 3) and rows[2]["epochs"] == "2"
    md = out.markdown.read_text().splitlines()
    assert md[0].startswith("| trial | state | val_probe_accuracy |")
    assert md[2].startswith(f"| **{best}** |")  # the best trial first, in bold
    assert md[-1].startswith("| 1 | FAIL |")  # trials without a value last
    lines = describe(study, "val_probe_accuracy")
    assert lines[0] == "study s: 3 COMPLETE, 1 FAIL"
    assert lines[1].startswith(f"best val_probe_accuracy {study.best_value:.6g}: trial {best}, /runs/s/trial_000{best}")
    assert lines[2] == f"reproduce: python scripts/train.py --i {best}"


def test_the_plots_are_written_and_too_few_trials_only_leave_a_note(tmp_path):
    files, notes = save_plots(study_of([0.5, 0.9, 0.7], second=True), tmp_path, "val_probe_accuracy")
    names = {p.name for p in files}
    assert {"s_history.png", "s_importances.png"} <= names and all(p.stat().st_size > 1000 for p in files)
    assert notes == []
    files, notes = save_plots(study_of([0.5, 0.9, 0.7]), tmp_path / "one", "val_probe_accuracy")
    assert {p.name for p in files} >= {"s_history.png"} and not any("importances" in p.name for p in files)
    assert notes == ["importances: the study searches 1 parameter(s); nothing to rank"]
    files, notes = save_plots(study_of([]), tmp_path / "none", "val_probe_accuracy")
    assert notes and all(p.parent == tmp_path / "none" for p in files)
