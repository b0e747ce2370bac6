"""The space file: what reads, what is refused with one line, and what a trial draws from it."""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna", reason="sweeps need the optional extra: pip install 'implicit-em[sweep]'")

from implicit_em.errors import ConfigError  # noqa: E402
from implicit_em.sweep.space import as_options, load_space, parse_space  # noqa: E402
from tests.conftest import REPO, run_script  # noqa: E402

GOOD = {
    "params": {
        "model.net.lambda_tc": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
        "model.n_components": {"type": "int", "low": 16, "high": 64, "step": 16},
        "model.net.selection": {"type": "categorical", "choices": ["row", "component"]},
    },
    "metric": "val_fvu",
}


def test_a_space_reads_and_trials_draw_inside_it():
    space = parse_space(GOOD)
    assert [p.name for p in space.params] == list(GOOD["params"])
    assert space.metric == "val_fvu" and space.direction is None
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = space.suggest(study.ask())
        assert 0.01 <= values["model.net.lambda_tc"] <= 10.0
        assert values["model.n_components"] in (16, 32, 48, 64)
        assert values["model.net.selection"] in ("row", "component")
    assert space.params[1].grid() == [16, 32, 48, 64]
    assert as_options({"a.b": 0.5, "c": True, "d": None, "e": "row", "f": 3}) == [
        "--a.b", "0.5", "--c", "true", "--d", "null", "--e", "row", "--f", "3"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "doc, says",
    [
        (["a list"], "non-empty 'params:' mapping"),
        ({"params": {}}, "non-empty 'params:' mapping"),
        ({"params": {"a": {"type": "float", "low": 0, "high": 1}}, "trials": 3}, "unknown key(s) trials"),
        ({"params": {"a": {"type": "normal", "low": 0, "high": 1}}}, "type float, int or categorical"),
        ({"params": {"a": {"type": "float", "low": 1}}}, "needs high, low"),
        ({"params": {"a": {"type": "float", "low": 0, "high": 1, "scale": 2}}}, "a float takes"),
        ({"params": {"a": {"type": "float", "low": 2, "high": 1}}}, "low must be below high"),
        ({"params": {"a": {"type": "float", "low": 0, "high": 1, "log": True}}}, "needs low > 0"),
        ({"params": {"a": {"type": "int", "low": 0.5, "high": 3}}}, "low must be an integer"),
        ({"params": {"a": {"type": "float", "low": "x", "high": 3}}}, "low must be a number"),
        ({"params": {"a": {"type": "categorical", "choices": []}}}, "non-empty list"),
        ({"params": {"a": {"type": "categorical", "choices": [1, 1]}}}, "repeat a value"),
        ({"params": {"a b": {"type": "float", "low": 0, "high": 1}}}, "not a train.py config key"),
        ({"params": {"report.split": {"type": "categorical", "choices": ["val"]}}}, "the sweep sets report.split"),
        ({"params": {"a": {"type": "float", "low": 0, "high": 1}}, "direction": "up"}, "maximize or minimize"),
    ],
)
def test_a_malformed_space_is_refused_naming_the_problem(doc, says):
    with pytest.raises(ConfigError, match=None) as caught:
        parse_space(doc, "s.yaml")
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_the_grid_needs_discrete_values():
    space = parse_space({"params": {"a": {"type": "float", "low": 0, "high": 1}}})
    with pytest.raises(ConfigError, match="--sampler grid needs discrete values"):
        space.grid()
    stepped = parse_space({"params": {"a": {"type": "float", "low": 0, "high": 1, "step": 0.25}}})
    assert stepped.grid() == {"a": [0.0, 0.25, 0.5, 0.75, 1.0]} and stepped.grid_size() == 5


def test_yaml_that_does_not_read_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: [not a mapping\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_space(bad)


def test_the_script_refuses_a_malformed_space_with_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  model.net.lambda_tc: {type: float, low: 1.0, high: 0.1}\n")
    run = run_script(REPO / "scripts" / "sweep.py", "--space", bad, "--study", "s", "--trials", "2",
                     "--root", tmp_path / "runs", timeout=120)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "low must be below high" in run.stderr
    assert run.stdout == "" and not (tmp_path / "runs").exists()
