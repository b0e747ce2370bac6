"""The BatchTopK SAE with AuxK: N k codes per batch in training, one threshold at inference (fitted after training
so that the training rows' mean L0 is k), dead components revived."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from implicit_em.errors import ConfigError
from implicit_em.models import MODELS, model_class
from implicit_em.models.base import batch_top_k
from implicit_em.models.batchtopk_sae import BatchTopKSAE

REPO = Path(__file__).resolve().parents[2]


def test_batch_top_k_keeps_the_n_k_largest_of_the_whole_batch():
    z = torch.tensor([[5.0, 4.0, -1.0], [0.5, 0.2, 3.0]])  # k = 1, N = 2: the 2 largest of the batch
    codes, theta = batch_top_k(z, 1)
    assert torch.equal(codes, torch.tensor([[5.0, 4.0, 0.0], [0.0, 0.0, 0.0]]))  # row 2 gets none, row 1 two
    assert float(theta) == 4.0


def test_registered_under_its_name_and_refuses_a_bad_setting():
    assert MODELS["batchtopk_sae"] is BatchTopKSAE is model_class("BatchTopKSAE")
    with pytest.raises(ConfigError, match="model.net.dead_rows"):
        BatchTopKSAE(8, 16, k=2, dead_rows=0)
    with pytest.raises(ConfigError, match="model.net.threshold_fit"):
        BatchTopKSAE(8, 16, k=2, threshold_fit="last")


def test_training_tracks_the_threshold_and_inference_uses_it():
    torch.manual_seed(0)
    net = BatchTopKSAE(8, 32, k=4, seed=1, dead_rows=3 * 256)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(256, 8)
    first_loss = None
    for step in range(60):
        terms = net.objective(x, step)
        opt.zero_grad()
        terms["loss"].backward()
        net.before_optimizer_step()
        opt.step()
        net.after_optimizer_step()
        first_loss = first_loss if first_loss is not None else float(terms["mse"])
    assert float(terms["mse"]) < 0.5 * first_loss  # it learns
    assert float(net.threshold) > 0
    with torch.no_grad():
        codes = net(x)
        z = torch.relu(net.encoder(x))
    assert torch.equal(codes, z * (z > net.threshold))  # the inference form, exactly
    assert 1 <= float((codes != 0).float().sum(1).mean()) <= 12  # about k per input on average (running mean)
    net.finish_training(x)  # the fit on the training rows: mean L0 k, within 5% (exactly, barring ties)
    assert float((net(x) != 0).float().sum(1).mean()) == pytest.approx(4, rel=0.05)
    running = BatchTopKSAE(8, 32, k=4, seed=1, threshold_fit="running")
    running.threshold.fill_(0.123)
    running.finish_training(x)
    assert float(running.threshold) == pytest.approx(0.123)  # the running mean kept


def test_the_dead_components_get_the_auxk_gradient():
    net = BatchTopKSAE(8, 16, k=1, seed=0, dead_rows=10)
    net.rows_since_fired.fill_(10)  # every component dead
    terms = net.objective(torch.randn(64, 8), 0)
    assert float(terms["dead"]) == 16 and float(terms["aux"]) > 0
    terms["loss"].backward()
    assert net.encoder.weight.grad.abs().sum(1).gt(0).sum() > 1  # more latents than the batch top-k's


def test_trains_exports_and_reloads_with_its_own_codes(tmp_path):
    """The house check in small: configs/model/batchtopk_sae.yaml trains through scripts/train.py's path, exports
    to the SAELens JumpReLU form, and implicit_em.load gives the codes of the run's own net."""
    import implicit_em
    from implicit_em.export import export_run
    from implicit_em.run.app import fit_run, rebuild

    path = fit_run([
        "--config", str(REPO / "configs" / "default.yaml"), "--config", str(REPO / "configs" / "model" / "batchtopk_sae.yaml"),
        "--model.n_components", "32", "--model.k", "4", "--trainer.max_epochs", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--components.every_n_epochs", "0", "--probe.every_n_epochs", "0", "--report.kmeans", "false",
        "--report.probe_method", "torch",
    ])  # fmt: skip
    metrics = json.loads(path.read_text())
    assert metrics["model"] == "batchtopk_sae" and 0 < metrics["l0"] < 32
    out = export_run(path.parent, tmp_path / "export")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["implicit_em"]["trained_as"] == "batchtopk"
    module, dm = rebuild(path.parent)
    dm.setup("fit")
    with torch.no_grad():  # the checkpoint holds the threshold fitted on the training rows after the last step
        train_l0 = float((module(dm.splits["train"].x) != 0).float().sum(1).mean())
    assert train_l0 == pytest.approx(4, rel=0.05), train_l0
    assert module.model.settings()["threshold"] == pytest.approx(metrics["threshold"])
    x = dm.splits["test"].x
    raw = dm.normalization.inverse()(x) if dm.normalization.inverse() else x
    with torch.no_grad():
        expected = module(x)
    sae = implicit_em.load(out)
    assert (sae.name, sae.architecture, sae.k, sae.n_components, sae.source) == ("batchtopk", "jumprelu", 4, 32,
                                                                                 "implicit_em")  # fmt: skip
    got = sae.encode(raw)
    assert np.allclose(got.numpy(), expected.numpy(), atol=1e-5)
    assert (got != 0).sum() > 0
