"""The LightningModules through the real training path: collapse, the Trainer's step settings counted in exact
optimiser steps (chunks of several steps per Lightning batch in play), callback hooks once per step, the
non-finite guard, the same data-aware start for the model and the SAE; the SAE configs' recipe through the
Trainer: Gao's learning rate with its warm-up and decay step by step, b_dec at the training mean."""

import csv
import re
from collections import Counter

import lightning as L
import pytest
import torch

from implicit_em.core.sae import gao_learning_rate, lr_factor
from implicit_em.models import implicit_em as module_lib
from implicit_em.models.implicit_em import ImplicitEM as Encoder
from implicit_em.models.sae import SparseAutoencoder
from implicit_em.run.app import main
from implicit_em.run.checkpoints import load_checkpoint
from tests.conftest import DEFAULT_CONFIG, QUIET, REPO, fit_in_process, model_weights

STEPS_PER_EPOCH = 11  # digits: 1,293 training samples in batches of 128, the last (13) kept


class StepRecorder(L.Callback):
    """Records, per optimiser step, the loss handed to backward and how often each per-step hook ran; the
    length of every Lightning batch (chunk); the global step of every validation and of every checkpoint saved
    (with its weights); the weights before step 1."""

    def __init__(self):
        self.losses: dict[int, float] = {}  # optimiser step (1-based) -> its loss
        self.hooks: Counter = Counter()
        self.chunks: list[int] = []
        self.validated_at: list[int] = []
        self.saved_at: list[int] = []
        self.saved_weights: dict[int, dict] = {}
        self.start: dict | None = None
        self.lrs: dict[int, float] = {}  # optimiser step (1-based) -> the learning rate it was taken with

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.chunks.append(len(batch))
        if self.start is None:  # after the module's on_train_start (the data-aware start), before any step
            self.start = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_before_backward(self, trainer, pl_module, loss):
        self.hooks["on_before_backward"] += 1
        self.losses[trainer.global_step + 1] = float(loss)

    def on_after_backward(self, trainer, pl_module):
        self.hooks["on_after_backward"] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.hooks["on_before_optimizer_step"] += 1
        self.lrs[trainer.global_step + 1] = optimizer.param_groups[0]["lr"]
        assert trainer.global_step + 1 == self.hooks["on_before_optimizer_step"]  # the step about to be taken

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated_at.append(trainer.global_step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saved_at.append(checkpoint["global_step"])
        state = checkpoint["state_dict"]
        self.saved_weights[checkpoint["global_step"]] = {k[6:]: state[k].clone() for k in state if k[:6] == "model."}


def fit(root, *args, **kwargs):
    rec = StepRecorder()
    cli = fit_in_process(root, *args, callbacks=[rec], **kwargs)
    return cli, rec


# -- the paper's collapse prediction -------------------------------------------------------------------

# lr 0.01 instead of the paper's 1e-3 so the contrast shows in a few epochs: with 1e-3 the full objective
# still has dead components for ~30 epochs on digits (variances start below the 0.01 threshold and the
# log-variance barrier lifts them slowly). With 0.01 the last one revives by epoch 6 for seeds 0-3; LSE-only
# has every component dead from epoch 1. Both runs share every setting except the two lambdas.
COLLAPSE = ["--trainer.max_epochs", "8", "--model.lr", "0.01", "--report.kmeans", "false",
            "--probe.every_n_epochs", "0", "--report.sae_metrics", "false"]  # fmt: skip


def test_lse_only_collapses_every_component_full_objective_none(train):
    lse_only = train(*COLLAPSE, "--model.net.lambda_var", "0", "--model.net.lambda_tc", "0")
    assert lse_only.returncode == 0, lse_only.stderr[-2000:]
    full = train(*COLLAPSE)
    assert full.returncode == 0, full.stderr[-2000:]
    k = lse_only.metrics["n_components"]
    assert k == 64
    assert lse_only.metrics["dead_components"] == k, lse_only.metrics["dead_components"]
    assert lse_only.metrics["lambda_var"] == 0 and lse_only.metrics["lambda_tc"] == 0
    assert full.metrics["dead_components"] == 0, full.metrics["dead_components"]
    # collapsed: every input gets near-identical distances, so the posterior is uninformative
    assert full.metrics["probe_accuracy"] > lse_only.metrics["probe_accuracy"]


# -- step settings count optimiser steps ------------------------------------------------------------------


def test_max_steps_counts_optimiser_steps_exactly(tmp_path):
    cli, rec = fit(tmp_path, "--trainer.max_steps", "37", "--trainer.max_epochs", "-1")
    assert cli.trainer.global_step == 37
    assert max(rec.chunks) > 1, rec.chunks  # several steps per Lightning batch were in play
    assert sum(rec.chunks) == 37 and max(rec.losses) == 37
    assert load_checkpoint(cli.trainer.checkpoint_callback.last_model_path)["global_step"] == 37


def test_every_per_step_hook_of_a_callback_runs_once_per_optimiser_step(tmp_path):
    cli, rec = fit(tmp_path, "--trainer.max_epochs", "2")
    steps = 2 * STEPS_PER_EPOCH
    assert cli.trainer.global_step == steps
    assert rec.hooks == {"on_before_backward": steps, "on_after_backward": steps, "on_before_optimizer_step": steps}
    assert len(rec.chunks) < steps and sum(rec.chunks) == steps  # chunks of several steps, every step hooked
    assert sorted(rec.losses) == list(range(1, steps + 1))


def _loss_steps(run_dir) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train/loss_step"])) for r in csv.DictReader(f) if r.get("train/loss_step")]


@pytest.mark.parametrize("every, steps_per_call", [(5, 10), (3, 6)])
def test_step_loss_is_written_at_every_nth_optimiser_step_with_that_steps_value(tmp_path, every, steps_per_call):
    args = ["--trainer.log_every_n_steps", str(every), "--data.steps_per_call", str(steps_per_call)]
    cli, rec = fit(tmp_path, "--trainer.max_epochs", "3", *args)
    steps = 3 * STEPS_PER_EPOCH
    logged = _loss_steps(cli.metrics_path.parent)
    assert [s for s, _ in logged] == list(range(every, steps + 1, every))  # across epoch boundaries too
    for step, value in logged:  # the loss of that very step, as handed to backward
        assert value == rec.losses[step], (step, value, rec.losses[step])
    assert max(rec.chunks) > 1, rec.chunks


EVERY_4_STEPS = ["--checkpoint.every_n_epochs", "0", "--checkpoint.every_n_train_steps", "4",
                 "--checkpoint.save_top_k", "-1", "--trainer.max_epochs", "2"]  # fmt: skip


def test_checkpoints_every_n_train_steps_land_exactly_on_those_steps(tmp_path):
    cli, rec = fit(tmp_path / "ckpt", *EVERY_4_STEPS)
    assert max(rec.chunks) > 1, rec.chunks  # chunks of 2 steps: gcd(steps_per_call, 4, log_every_n_steps 50)
    assert rec.saved_at == [4, 8, 12, 16, 20], rec.saved_at
    # what was saved at step 12 holds the weights after exactly 12 optimiser steps
    twelve, _ = fit(tmp_path / "twelve", "--trainer.max_steps", "12", "--trainer.max_epochs", "-1")
    for name, value in model_weights(twelve.model).items():
        assert torch.equal(rec.saved_weights[12][name], value), name


def test_every_step_checkpoint_is_kept_under_its_own_step(tmp_path):
    cli, _ = fit(tmp_path, *EVERY_4_STEPS)
    folder = cli.metrics_path.parent / "checkpoints"
    saved = {p.name: load_checkpoint(p)["global_step"] for p in folder.glob("epoch=*.ckpt")}
    assert sorted(saved.values()) == [4, 8, 12, 16, 20], saved
    for name, step in saved.items():
        assert name == f"epoch={(step - 1) // STEPS_PER_EPOCH}-step={step}.ckpt"


def test_limit_train_batches_counts_optimiser_steps(tmp_path):
    cli, rec = fit(tmp_path / "int", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "5")
    assert cli.trainer.global_step == 10 and rec.chunks == [1] * 10
    cli, rec = fit(tmp_path / "frac", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "0.5")
    assert cli.trainer.global_step == 2 * int(0.5 * STEPS_PER_EPOCH) and set(rec.chunks) == {1}


def test_val_check_interval_counts_optimiser_steps(tmp_path):
    cli, rec = fit(tmp_path, "--trainer.max_epochs", "2", "--trainer.val_check_interval", "4")
    assert cli.trainer.global_step == 22 and set(rec.chunks) == {1}
    # validation after every 4th optimiser step of each epoch (4, 8 | 11 + 4, 11 + 8)
    assert [s for s in rec.validated_at if s % STEPS_PER_EPOCH] == [4, 8, 15, 19], rec.validated_at


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_chunked_run_equals_one_step_per_lightning_batch_bitwise(tmp_path, optimizer):
    args = [
        "--trainer.max_epochs",
        "2",
        "--model.n_components",
        "16",
        "--model.optimizer",
        {"adam": "Adam", "sgd": "SGD"}[optimizer],
    ]
    if optimizer == "sgd":
        args += ["--model.lr", "0.01", "--model.optimizer.momentum", "0.9"]
    chunked, rec_chunked = fit(tmp_path / "chunked", *args)
    single, rec_single = fit(tmp_path / "single", *args, "--data.steps_per_call", "1")
    assert max(rec_chunked.chunks) > 1 and set(rec_single.chunks) == {1}
    assert chunked.trainer.global_step == single.trainer.global_step == 2 * STEPS_PER_EPOCH
    a, b = model_weights(chunked.model), model_weights(single.model)
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())
    assert rec_chunked.losses == rec_single.losses
    # the epoch means are means of chunk means (float32), equal up to rounding
    mean = float(single.trainer.callback_metrics["train/loss"])
    assert float(chunked.trainer.callback_metrics["train/loss"]) == pytest.approx(mean, rel=1e-6)


# -- the data-aware start, the same for the model and the SAE -----------------------------------------------


def test_data_aware_start_is_the_same_for_the_model_and_the_sae(tmp_path):
    one_step = ["--trainer.max_steps", "1", "--trainer.max_epochs", "-1", "--seed_everything", "4"]
    sae_args = ["--model.net", "SparseAutoencoder"]
    em, rec_em = fit(tmp_path / "em", *one_step)
    sae, rec_sae = fit(tmp_path / "sae", *one_step, *sae_args)
    x = em.datamodule.splits["train"].x
    for cli, rec, prefix in ((em, rec_em, "linear"), (sae, rec_sae, "encoder")):
        w, b = rec.start[f"{prefix}.weight"], rec.start[f"{prefix}.bias"]
        pre = x @ w.T + b
        assert torch.allclose(pre.std(0), torch.full((64,), 0.3), atol=1e-4)  # init_std over the training split
        assert bool(cli.model.initialized)
    # the same seeded start, adjusted the same way: the SAE's encoder starts where the model's W starts
    assert torch.equal(rec_em.start["linear.weight"], rec_sae.start["encoder.weight"])
    assert torch.equal(rec_em.start["linear.bias"], rec_sae.start["encoder.bias"])
    # the decoder is not adjusted: nn.Linear's start from the same generator, drawn after the encoder
    ref = SparseAutoencoder(64, 64, seed=4)
    assert torch.equal(rec_sae.start["decoder.weight"], ref.decoder.weight)


@pytest.mark.parametrize("model", ["ImplicitEM", "SparseAutoencoder"])
def test_data_init_false_keeps_the_seeded_nn_linear_start(tmp_path, model):
    cli, rec = fit(
        tmp_path, "--trainer.max_steps", "1", "--trainer.max_epochs", "-1", "--seed_everything", "4",
        "--model.net", model, "--model.data_init", "false",
    )  # fmt: skip
    ref = Encoder(64, 64, seed=4).linear if model.endswith("ImplicitEM") else SparseAutoencoder(64, 64, seed=4).encoder
    first = "linear" if model.endswith("ImplicitEM") else "encoder"
    assert torch.equal(rec.start[f"{first}.weight"], ref.weight) and torch.equal(rec.start[f"{first}.bias"], ref.bias)


# -- the SAE configs' recipe through the Trainer ------------------------------------------------------------

TOPK = ["--config", str(REPO / "configs" / "model" / "topk_sae.yaml"), "--model.n_components", "32", "--model.k", "4"]


def test_the_sae_config_steps_with_gaos_rate_warmed_up_and_decayed(tmp_path):
    schedule = ["--model.lr_warmup_steps", "4", "--model.lr_decay_fraction", "0.5"]
    cli, rec = fit(tmp_path / "set", *TOPK, *schedule, "--trainer.max_epochs", "2")
    steps = 2 * STEPS_PER_EPOCH
    assert max(rec.chunks) > 1 and cli.model.total_steps == steps  # T known without a loader length
    expected = {t + 1: gao_learning_rate(32) * lr_factor(t, steps, 4, 0.5) for t in range(steps)}
    assert rec.lrs == pytest.approx(expected, rel=1e-12)
    assert rec.lrs[4] == rec.lrs[11] == pytest.approx(2e-4 / (32 / 2**14) ** 0.5)  # full rate after the warm-up
    assert rec.lrs[1] == pytest.approx(rec.lrs[4] / 4) and rec.lrs[steps] == pytest.approx(rec.lrs[4] / 11)
    # the config's own warm-up: min(1000, T / 20) = 1 step here, and decay over the last 20%
    cli, rec = fit(tmp_path / "config", *TOPK, "--trainer.max_epochs", "2")
    assert rec.lrs == pytest.approx({t + 1: gao_learning_rate(32) * lr_factor(t, steps, 1, 0.2) for t in range(steps)})


def test_the_sae_config_starts_b_dec_at_the_training_mean(tmp_path):
    cli, rec = fit(tmp_path, *TOPK, "--trainer.max_steps", "1", "--trainer.max_epochs", "-1")
    mean = cli.datamodule.splits["train"].x.mean(0)
    assert torch.allclose(rec.start["decoder.bias"], mean, atol=1e-5)
    assert torch.allclose(rec.start["encoder.bias"], -rec.start["encoder.weight"] @ mean, atol=1e-5)
    assert torch.equal(rec.start["encoder.weight"], rec.start["decoder.weight"].T)  # the decoder's transpose
    norms = cli.model.model.decoder.weight.norm(dim=0)  # after the step too
    assert torch.allclose(norms, torch.ones(32), atol=1e-6)


# -- the non-finite guard --------------------------------------------------------------------------------

NON_FINITE = re.compile(r"non-finite (\w+) loss at optimiser step (\d+) \(epoch (\d+)\)")


def _assert_clean_stop(code: int, stderr: str, root, term: str | None = None, step: int | None = None):
    assert code == 3, (code, stderr[-2000:])
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "non-finite" in line]
    assert len(errors) == 1, stderr[-3000:]
    line = errors[0]
    assert line == stderr.strip().splitlines()[-1] and line.startswith("error: ")
    named = NON_FINITE.search(line)
    assert named, line
    assert named.group(1) in (term or "lse var tc wr").split(), line  # a term, not just "loss"
    if step is not None:
        assert int(named.group(2)) == step, line
    assert not list(root.glob("**/metrics.json"))
    return named


def test_diverging_run_stops_with_one_line(train, tmp_path):
    run = train("--model.net.activation", "exp", "--model.lr", "100", "--trainer.max_epochs", "3", timeout=300)
    _assert_clean_stop(run.returncode, run.stderr, tmp_path)
    assert "metrics.json" not in run.stdout


@pytest.mark.parametrize("term", ["tc", "var"])
def test_nan_term_is_named_with_its_optimiser_step(tmp_path, monkeypatch, capsys, term):
    real = module_lib.implicit_em_objective
    calls = []

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 13:  # the 13th optimiser step: 11 steps an epoch, so inside epoch 1 (in its first chunk)
            out[term] = out[term] * float("nan")
            out["loss"] = out["loss"] + out[term]
        return out

    monkeypatch.setattr(module_lib, "implicit_em_objective", poisoned)
    code = main(["--trainer.default_root_dir", str(tmp_path), *QUIET, "--trainer.max_epochs", "3"], [DEFAULT_CONFIG])
    err = capsys.readouterr().err
    named = _assert_clean_stop(code, err, tmp_path, term=term, step=13)
    assert named.group(3) == "1"
    assert "last.ckpt" in err  # the checkpoint of epoch 0 is named as the last good one
