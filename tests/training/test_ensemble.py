"""Ensembles (implicit_em.training.ensemble.Ensemble): each member is bitwise the lone run of its class with its settings
(its seed, the same data settings and the ensemble's data order); a member whose loss goes non-finite stops
alone; a run fails only when every member stopped; an ensemble resumes exactly from its checkpoint.

The data order follows ``--seed_everything`` (linked to ``data.shuffle_seed``) and the ensemble has one; so a
member whose seed is the ensemble's ``--seed_everything`` equals ``scripts/train.py --seed_everything <seed>``
with its settings, and any other member equals that lone run with the data order set back to the ensemble's
(done in process below: the link leaves no command-line way to give a lone run both).
"""

from __future__ import annotations

import json

import pytest
import torch

from implicit_em.run.app import fit, main
from implicit_em.run.checkpoints import load_checkpoint
from implicit_em.run.runtime import training_process
from implicit_em.training.ensemble import Ensemble
from tests.conftest import DEFAULT_CONFIG, QUIET, fit_in_process, model_weights

K = "16"
#: two epochs, evaluated without the SAE numbers (ridge readout, k-sparse probes, density figure): nothing here
#: reads them; the diverging run below keeps them on, so a member's full evaluation still runs
COMMON = ["--trainer.max_epochs", "2", "--report.sae_metrics", "false"]
#: different seeds, learning rates and loss weights (and a subset estimate of L_tc, whose subsets follow the
#: optimiser step), so that a member taking another's data or settings shows
MEMBERS = [
    {"seed": 0, "lr": 0.002},
    {"seed": 3, "lr": 0.005, "lambda_tc": 0.5, "lambda_var": 2.0, "tc_components": 8},
    {"seed": 5, "lr": 0.002, "lambda_lse": 0.5, "lambda_wr": 0.1},
]
OPTIMIZERS = {"adam": {}, "sgd": {"optimizer": "SGD", "momentum": 0.9}}


def ensemble_args(members: list[dict], defaults: dict | None = None) -> list[str]:
    args = ["--model.class_path", "implicit_em.training.ensemble.Ensemble", "--model.init_args.members", json.dumps(members),
            "--model.init_args.n_components", K]  # fmt: skip
    return args + (["--model.init_args.defaults", json.dumps(defaults)] if defaults else [])


def lone_args(member: dict, defaults: dict) -> list[str]:
    """The plain run of one member: its seed as --seed_everything, its settings as --model.<key> (the module's),
    --model.optimizer <class> and --model.optimizer.<key>, --model.net.<key> (the net's)."""
    settings = {**defaults, **member}
    args = ["--seed_everything", str(settings.pop("seed")), "--model.n_components", K]
    if "optimizer" in settings:
        args += ["--model.optimizer", settings.pop("optimizer")]
    for key, value in settings.items():
        section = "model" if key == "lr" else "model.optimizer" if key == "momentum" else "model.net"
        args += [f"--{section}.{key}", str(value)]
    return args


def lone_run(root, member: dict, defaults: dict, *args: str, data_order: int = 0):
    """The lone run of one member (:func:`lone_args`), reading the data in the ensemble's order ``data_order``:
    the plain command-line run when the member's seed is ``data_order``."""
    cli = fit_in_process(root, *lone_args(member, defaults), *args, fit=False)
    assert cli.datamodule.shuffle_seed == member["seed"]  # linked to --seed_everything
    cli.datamodule.shuffle_seed = data_order
    with training_process():
        cli.metrics_path = fit(cli).metrics_path
    return cli


@pytest.fixture(scope="module")
def lone_runs(tmp_path_factory):
    """``lone_runs(optimizer, s)``: the lone run of MEMBERS[s] with that optimiser, trained once per module."""
    cache = {}

    def get(optimizer: str, s: int):
        if (optimizer, s) not in cache:
            root = tmp_path_factory.mktemp(f"lone-{optimizer}-{s}")
            cache[optimizer, s] = lone_run(root, MEMBERS[s], OPTIMIZERS[optimizer], *COMMON)
        return cache[optimizer, s]

    return get


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def ensemble_and_lone_runs(request, tmp_path_factory, lone_runs):
    defaults = OPTIMIZERS[request.param]
    root = tmp_path_factory.mktemp(f"ensemble-{request.param}")
    ensemble = fit_in_process(root / "ensemble", *COMMON, *ensemble_args(MEMBERS, defaults))
    assert ensemble.datamodule.shuffle_seed == 0  # --seed_everything 0 (default.yaml)
    return request.param, ensemble, [lone_runs(request.param, s) for s in range(len(MEMBERS))]


def test_each_member_is_bitwise_its_lone_run(ensemble_and_lone_runs):
    optimizer, ensemble, lone = ensemble_and_lone_runs
    members = ensemble.model.members
    assert isinstance(ensemble.model, Ensemble) and len(members) == len(MEMBERS)
    for s, alone in enumerate(lone):
        assert alone.model.optimizer_name == optimizer == members[s].optimizer_name
        assert alone.trainer.global_step == ensemble.trainer.global_step == 22
        a, b = model_weights(members[s]), model_weights(alone.model)
        assert a.keys() == b.keys() == {"linear.weight", "linear.bias"}
        for name in a:
            assert torch.equal(a[name], b[name]), (s, name, float((a[name] - b[name]).abs().max()))
        member_loss = float(ensemble.trainer.callback_metrics[f"train/loss/m{s}"])
        assert "train/loss" in alone.trainer.callback_metrics, sorted(alone.trainer.callback_metrics)
        assert member_loss == pytest.approx(float(alone.trainer.callback_metrics["train/loss"]), rel=1e-6)
    # the members differ from each other, so the comparison has teeth
    assert not torch.allclose(members[0].model.linear.weight, members[1].model.linear.weight, atol=1e-3)
    # member 0's seed is the ensemble's --seed_everything: its lone run is the plain command-line run
    assert MEMBERS[0]["seed"] == ensemble.datamodule.shuffle_seed == 0


def test_metrics_json_has_every_member_and_member_0_on_top(ensemble_and_lone_runs):
    _, ensemble, lone = ensemble_and_lone_runs
    m = json.loads(ensemble.metrics_path.read_text())
    assert m["model"] == "Ensemble" and len(m["members"]) == len(MEMBERS)
    for s, (row, alone) in enumerate(zip(m["members"], lone)):
        assert row["name"] == f"m{s}" and row["stopped_at_step"] == 0 and row["stopped_because"] is None
        assert row["seed"] == MEMBERS[s]["seed"] and row["lr"] == MEMBERS[s]["lr"]
        solo = json.loads(alone.metrics_path.read_text())
        assert row["final_loss"] == pytest.approx(solo["final_loss"], rel=1e-6)
        assert row["probe_accuracy"] == solo["probe_accuracy"] and row["dead_components"] == solo["dead_components"]
    assert m["probe_accuracy"] == m["members"][0]["probe_accuracy"]


def test_a_plain_run_knows_nothing_of_members(ensemble_and_lone_runs):
    _, _, lone = ensemble_and_lone_runs
    state = load_checkpoint(lone[0].trainer.checkpoint_callback.last_model_path)["state_dict"]
    assert {k for k in state if k.startswith("model.")} == {"model.linear.weight", "model.linear.bias"}
    assert state["model.linear.weight"].shape == (int(K), 64)


def test_members_times_seeds(tmp_path):
    ens = Ensemble(members=[{"lr": 0.01, "name": "a"}, {"lr": 0.02}], seeds=[1, 2, 3], in_features=8, n_components=4)
    assert [(m.hparams.lr, m.hparams.seed) for m in ens.members] == [(0.01, s) for s in (1, 2, 3)] + [
        (0.02, s) for s in (1, 2, 3)
    ]
    assert ens.alive() == list(range(6)) and ens.member_status(5)["stopped_at_step"] == 0
    assert ens.names[:3] == ["a"] * 3


# -- a non-finite member stops alone ------------------------------------------------------------------------

POISONED_STEP = 13  # inside epoch 1 (11 steps an epoch)


def _poison(member, term: str, at_call: int) -> None:
    """Make ``member``'s objective return a NaN ``term`` (and total) on its ``at_call``-th call."""
    real, calls = member.objective, []

    def objective(x, step=None):
        out = real(x, step)
        calls.append(1)
        if len(calls) == at_call:
            out[term] = out[term] * float("nan")
            out["loss"] = out["loss"] + out[term]
        return out

    member.objective = objective


def fit_poisoned(root, *args: str, member: int = 1, term: str = "tc", at_call: int = POISONED_STEP):
    """An in-process ensemble fit whose member ``member`` gets a NaN ``term`` on its ``at_call``-th step."""
    cli = fit_in_process(root, *args, fit=False)
    _poison(cli.model.members[member], term, at_call)
    with training_process():
        cli.metrics_path = fit(cli).metrics_path
    return cli


@pytest.fixture(scope="module")
def one_member_stops(tmp_path_factory):
    root = tmp_path_factory.mktemp("stops")
    cli = fit_poisoned(root / "ensemble", *COMMON, *ensemble_args(MEMBERS))
    return cli, json.loads(cli.metrics_path.read_text()), root


def test_a_member_with_a_non_finite_loss_stops_alone_and_says_when(one_member_stops):
    cli, m, _ = one_member_stops
    assert cli.trainer.global_step == 22 and not cli.trainer.interrupted  # the run went on to the end
    rows = m["members"]
    assert rows[1]["stopped_at_step"] == POISONED_STEP
    assert rows[1]["stopped_because"] == f"non-finite tc loss at optimiser step {POISONED_STEP}"
    for s in (0, 2):
        assert rows[s]["stopped_at_step"] == 0 and rows[s]["stopped_because"] is None
    scores = ("probe_accuracy", "dead_components", "redundancy", "cluster_accuracy", "final_loss")
    for s in (0, 2):  # the others are evaluated as usual
        assert all(isinstance(rows[s][k], (int, float)) for k in scores), rows[s]
    # the stopped member reports its status and the losses of its finite steps, not a probe of its weights
    assert "probe_accuracy" not in rows[1] and isinstance(rows[1]["final_loss"], float)


def test_the_others_are_untouched_and_the_stopped_member_keeps_its_last_finite_step(one_member_stops, lone_runs):
    cli, _, root = one_member_stops
    members = cli.model.members
    for s in (0, 2):
        for name, value in model_weights(lone_runs("adam", s).model).items():
            assert torch.equal(model_weights(members[s])[name], value), (s, name)
    # member 1: the weights of its lone run after the 12 steps before the poisoned one
    before = ["--trainer.max_steps", str(POISONED_STEP - 1), "--trainer.max_epochs", "-1",
              "--report.sae_metrics", "false"]  # fmt: skip
    stopped = lone_run(root / "lone1", MEMBERS[1], {}, *before)
    for name, value in model_weights(stopped.model).items():
        assert torch.equal(model_weights(members[1])[name], value), name


def test_the_run_exits_0_when_one_member_diverges(train):
    # lr 1e30 with phi = z^2: the first step puts W near 1e30, so the second step's distances overflow to inf
    members = [{"seed": 0}, {"seed": 1, "lr": 1e30, "activation": "square"}]
    run = train("--trainer.max_epochs", "2", *ensemble_args(members), "--report.kmeans", "false",
                "--report.probe_method", "torch")  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = run.metrics["members"]
    assert rows[0]["stopped_at_step"] == 0 and rows[0]["final_loss"] is not None
    assert rows[1]["stopped_at_step"] == 2 and rows[1]["stopped_because"].startswith("non-finite")
    assert rows[1]["stopped_because"].endswith("loss at optimiser step 2")


def test_every_member_non_finite_stops_the_run_with_one_line(tmp_path, capsys):
    members = [{"seed": 0, "lr": 1e30}, {"seed": 1, "lr": 1e30, "optimizer": "sgd"}]
    args = [*QUIET, "--trainer.default_root_dir", str(tmp_path), *COMMON,
            *ensemble_args(members, {"activation": "square"})]  # fmt: skip
    code = main(args, [DEFAULT_CONFIG])
    err = capsys.readouterr().err
    assert code == 3, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "non-finite" in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err[-2000:]
    assert errors[0].startswith("error: every member stopped on a non-finite loss")
    assert "member 0: non-finite" in errors[0] and "member 1: non-finite" in errors[0]
    assert "optimiser step 2" in errors[0]
    assert not list(tmp_path.rglob("metrics.json"))


# -- resume -------------------------------------------------------------------------------------------------


def test_an_ensemble_resumes_exactly_from_its_checkpoint(tmp_path):
    # member 1 stops in epoch 1: its stop record must survive the resume too
    members = [{"seed": 0, "lr": 0.003}, {"seed": 1}, {"seed": 2, "optimizer": "sgd", "momentum": 0.9}]
    args = [*ensemble_args(members), *COMMON, "--trainer.max_epochs", "3"]
    whole = fit_poisoned(tmp_path / "whole", *args)
    fit_poisoned(tmp_path / "resumed", *ensemble_args(members), *COMMON)
    resumed = fit_in_process(tmp_path / "resumed", *args, "--ckpt_path", "last")
    assert resumed.trainer.global_step == whole.trainer.global_step == 33
    assert resumed.metrics_path.parent == tmp_path / "resumed" / "implicit_em" / "version_0"  # the same run
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    first = json.loads(whole.metrics_path.read_text())["members"]
    again = json.loads(resumed.metrics_path.read_text())["members"]
    assert again[1]["stopped_at_step"] == first[1]["stopped_at_step"] == POISONED_STEP
    assert again[1]["stopped_because"] == first[1]["stopped_because"] is not None
    for s in (0, 2):
        assert again[s]["final_loss"] == pytest.approx(first[s]["final_loss"], rel=1e-6)


def test_a_batchtopk_member_takes_the_sae_recipe_as_its_lone_run(tmp_path):
    """The recipe's hooks run for members as for a lone run: the learning-rate schedule, the unit-norm decoder, the
    dead window and the threshold fitted after the last step."""
    from tests.conftest import REPO

    recipe = {"k": 4, "lr": "gao", "lr_warmup_steps": 3, "lr_decay_fraction": 0.5}
    lone = fit_in_process(tmp_path / "lone", "--config", str(REPO / "configs" / "model" / "batchtopk_sae.yaml"),
                          "--model.n_components", K, "--model.k", "4", "--model.lr_warmup_steps", "3",
                          "--model.lr_decay_fraction", "0.5", *COMMON)  # fmt: skip
    ensemble = fit_in_process(tmp_path / "ensemble", *COMMON, *ensemble_args([{"seed": 0}, {"seed": 3}], recipe),
                              "--model.init_args.member_class", "batchtopk_sae")  # fmt: skip
    a, b = model_weights(ensemble.model.members[0]), model_weights(lone.model)
    assert a.keys() == b.keys() and "threshold" in a
    for name in a:
        assert torch.equal(a[name], b[name]), (name, a[name], b[name])
    member = ensemble.model.members[1].model
    assert torch.allclose(member.decoder.weight.norm(dim=0), torch.ones(int(K)), atol=1e-6)
    assert float(member.threshold) != float(lone.model.model.threshold)  # the other seed: its own fit
