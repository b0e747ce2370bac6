"""The rows compare and frontier judge: the baselines' codes, the one evaluation, and a trained row's numbers
taken from its own fit."""

from __future__ import annotations

import pytest
import torch

from implicit_em.data.memory import Split
from implicit_em.experiments.rows import (
    RAW,
    Data,
    Row,
    evaluate_row,
    fitted_numbers,
    kmeans_row,
    matched_k,
    module_row,
    pca_row,
    random_encoder,
    train_args,
)
from tests.experiments.conftest import REPO


def _data(n: int = 300, d: int = 5) -> Data:
    g = torch.Generator().manual_seed(0)
    splits = {}
    for name, rows in (("train", n), ("val", n // 3), ("test", n // 3)):
        y = torch.randint(0, 3, (rows,), generator=g)
        x = torch.randn(rows, d, generator=g) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1])[:d] + 3 * y.unsqueeze(1)
        splits[name] = Split(x, y)
    return Data(splits, None)


def test_pca_features_are_centred_projections_in_order_of_variance():
    data = _data()
    f = pca_row(data, 3).features(data)
    assert f["train"].shape == (300, 3)
    assert f["train"].mean(0).abs().max() < 1e-4  # centred on the training mean
    var = f["train"].var(0)
    assert (var[:-1] >= var[1:]).all()
    full = evaluate_row(pca_row(data, 5), data, "torch")  # all of D: a perfect readout
    assert full["fvu"] < 1e-8


def test_kmeans_features_are_one_hot():
    row = kmeans_row(_data(), 4, seed=0)
    f = row.features(_data())
    assert f["test"].shape == (100, 4) and torch.equal(f["test"].sum(1), torch.ones(100))
    assert evaluate_row(row, _data(), "torch")["l0"] == pytest.approx(1.0)


def test_raw_rows_have_probes_only():
    data = _data()
    row = evaluate_row(RAW, data, "torch", probes_only=True)
    assert row["fvu"] is None and row["l0"] is None and "fvu_decoder" not in row
    assert set(row["sparse_probe_accuracy"]) == {"1", "2", "5", "20"} and row["probe_accuracy"] > 0.5


def test_a_row_with_its_own_decoder_gets_the_decoders_fvu_as_sparsify_computes_it():
    data = _data()
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    row = evaluate_row(Row(lambda x: x @ w, lambda f: f @ w.pinverse()), data, "torch")
    x = data.splits["test"].x.double()
    x_hat = x @ w.double() @ w.pinverse().double()
    expected = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())  # over every row and dimension
    assert row["fvu_decoder"] == pytest.approx(expected, rel=1e-5) and row["fvu_decoder"] >= row["fvu"] - 1e-6


def test_matched_k_rounds_and_clips():
    assert matched_k(3.4, 16) == 3 and matched_k(0.2, 16) == 1 and matched_k(float("nan"), 16) == 1
    assert matched_k(40.0, 16) == 16


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 1-epoch TopK SAE on digits whose end-of-run report is the experiments' evaluation."""
    from implicit_em.run.app import fit_module

    root = tmp_path_factory.mktemp("rows")
    args = train_args(REPO / "configs", "digits", "topk_sae", root, 1, 3, 16, None, None, "torch", 0, "test",
                      "--model.k", "4")  # fmt: skip
    return args, fit_module(args)


def test_a_trained_rows_numbers_are_its_modules_own_evaluation(fitted):
    _, fit = fitted
    assert not fit.module.training and fit.datamodule.splits  # in eval mode; the DataModule set up
    data = Data.of(fit.datamodule)
    again = evaluate_row(module_row(fit.module), data, "torch")
    numbers = fitted_numbers(fit.metrics)
    assert set(numbers) == set(again)  # the fit's report holds every number of the one evaluation
    for key, value in again.items():
        assert numbers[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert 0 < numbers["fvu_decoder"] and numbers["l0"] <= 4 + 1e-9
    assert "epoch_seconds" not in numbers and "eval_seconds" in fit.metrics


def test_the_random_encoder_is_the_untrained_module_of_the_same_settings(fitted):
    from implicit_em.run.app import rebuild

    args, fit = fitted
    data = Data.of(fit.datamodule)
    ours = random_encoder(args, data)
    before, _ = rebuild(fit.run, trained=False)  # what the run's saved config builds, before training
    before.fit_to_data(data.splits["train"].x)
    for key, value in before.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert not torch.equal(ours.model.encoder.weight, fit.module.model.encoder.weight)  # not the trained weights


def test_a_saved_sae_is_judged_on_raw_activations_through_its_own_decoder():
    from implicit_em.data.normalization import Normalization
    from implicit_em.experiments.rows import sae_parameters, sae_row
    from implicit_em.sae_folders import ExportedSAE

    raw = _data()
    norm = Normalization.fit(raw.splits["train"].x, "center+scale")
    splits = {n: Split(norm(s.x).float(), s.y) for n, s in raw.splits.items()}
    data = Data(splits, norm.inverse(), None, norm)  # what the evaluation sees: normalised rows
    g = torch.Generator().manual_seed(2)
    tensors = {"W_enc": torch.randn(5, 6, generator=g), "b_enc": torch.randn(6, generator=g),
               "W_dec": torch.randn(6, 5, generator=g), "b_dec": torch.randn(5, generator=g)}  # fmt: skip
    sae = ExportedSAE(tensors, {}, "topk", k=2)
    row = sae_row(sae, data)
    x = raw.splits["test"].x  # raw activations in, raw out
    torch.testing.assert_close(row.encode(splits["test"].x), sae.encode(x), rtol=1e-4, atol=1e-4)
    out = evaluate_row(row, data, "torch")
    x64, x_hat = x.double(), sae.decode(sae.encode(x)).double()
    expected = float((x64 - x_hat).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())
    assert out["fvu_decoder"] == pytest.approx(expected, rel=1e-4) and out["l0"] <= 2 + 1e-9
    assert sae_parameters(sae) == {"parameters_code": 5 * 6 + 6, "parameters_reconstruction": 2 * 5 * 6 + 6 + 5}
    with pytest.raises(Exception, match="--sae: an SAE on 5-dimensional inputs"):
        sae_row(sae, _data(d=4))


def test_the_data_of_a_fits_arguments_built_afresh_is_the_data_of_that_fit(tmp_path):
    from implicit_em.run.app import fit_module

    args = train_args(REPO / "configs", "digits", "topk_sae", tmp_path, 1, 5, 16, None, None, "torch", 0, "test",
                      "--model.k", "4", "--data.normalization", "standardize", "--trainer.max_steps", "1")  # fmt: skip
    fit = fit_module([*args, "--report.sae_metrics", "false"])
    ours, again = Data.of(fit.datamodule), Data.configured(args)
    assert again.datamodule is not fit.datamodule
    for name, split in ours.splits.items():
        assert torch.equal(again.splits[name].x, split.x) and torch.equal(again.splits[name].y, split.y), name
    x = torch.randn(5, ours.dims)
    assert torch.equal(again.to_raw(x), ours.to_raw(x)) and not torch.equal(ours.to_raw(x), x)
    assert torch.equal(again.normalize(x), ours.normalize(x))
