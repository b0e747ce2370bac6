"""The SAE users' metrics against values computed by hand on tiny inputs."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch

from implicit_em.eval.sae_metrics import (
    RIDGE_GRID,
    _sparse_gram,
    dead_fraction,
    firing_frequency,
    fit_ridge_readout,
    group_means,
    l0,
    log10_density,
    readout_scores,
    sae_evaluation,
    sparse_probe_accuracy,
    top_k_by_mean_difference,
    write_density_histogram,
)

# rows: one active (0.5), one active (0.02), none (0.005 < 0.01); component 2 never fires
F = torch.tensor([[0.0, 0.5, 0.0], [0.02, 0.0, 0.0], [0.0, 0.005, 0.0]])


def test_activity_by_hand():
    assert firing_frequency(F).tolist() == pytest.approx([1 / 3, 1 / 3, 0.0])
    assert l0(F) == pytest.approx(2 / 3)
    assert dead_fraction(F) == pytest.approx(1 / 3)
    assert l0(F, threshold=0.001) == pytest.approx(1.0)  # the threshold is a setting
    assert dead_fraction(F, threshold=0.1) == pytest.approx(2 / 3)


def test_activity_over_a_window_of_several_tensors_equals_the_concatenation():
    a, b = F[:2], F[2:]
    assert l0([a, b]) == pytest.approx(l0(F))
    assert dead_fraction([a, b]) == pytest.approx(dead_fraction(F))
    assert dead_fraction(F[1:]) == pytest.approx(2 / 3)  # component 1 fires only in row 0


def test_signed_features_count_by_magnitude():
    assert l0(torch.tensor([[-0.5, 0.0], [0.0, 0.3]])) == pytest.approx(1.0)


def test_log10_density_puts_dead_components_at_minus_ten():
    d = log10_density(F)
    assert d[0].item() == pytest.approx(math.log10(1 / 3))
    assert d[2].item() == pytest.approx(-10.0)


def test_density_histogram_is_a_png_and_leaves_the_backend_alone(tmp_path):
    before = matplotlib.get_backend()
    path = write_density_histogram(log10_density(F), tmp_path / "sub" / "density.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == before


def test_readout_scores_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # residual 1; sum ||x - mean||^2 = 0.5 + 0.5 = 1; cosines 1 and 0 (x_hat = 0); norm ratios 1 and 0
    s = readout_scores(x, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert s == pytest.approx({"fvu": 1.0, "explained_variance": 0.0, "cosine": 0.5, "l2_ratio": 0.5})
    s = readout_scores(x, 2 * x)  # residual = sum ||x||^2 = 2
    assert s == pytest.approx({"fvu": 2.0, "explained_variance": -1.0, "cosine": 1.0, "l2_ratio": 2.0})
    assert readout_scores(x, x)["fvu"] == 0.0


def test_readout_scores_on_raw_activations():
    torch.manual_seed(0)
    x, x_hat = torch.randn(50, 4), torch.randn(50, 4)
    scale, shift = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.randn(4)

    def to_raw(t):
        return t * scale + shift

    assert readout_scores(x, x_hat, to_raw) == pytest.approx(readout_scores(to_raw(x), to_raw(x_hat)))
    assert readout_scores(x, x_hat, to_raw)["fvu"] != pytest.approx(readout_scores(x, x_hat)["fvu"])


def test_a_perfect_readout_gives_fvu_zero():
    torch.manual_seed(0)
    f = torch.rand(300, 6)
    r, c = torch.randn(6, 4), torch.randn(4)
    x = f @ r + c
    readout = fit_ridge_readout(f[:200], x[:200], f[200:250], x[200:250])
    assert torch.allclose(readout.R.float(), r, atol=1e-3) and torch.allclose(readout.c.float(), c, atol=1e-3)
    assert readout_scores(x[250:], readout(f[250:]))["fvu"] < 1e-8
    assert readout.ridge == min(RIDGE_GRID)  # no noise: the weakest ridge fits best


def test_the_dual_solves_the_same_ridge_as_the_normal_equations():
    """N < K: R = F_c^T (F_c F_c^T + a I)^-1 X_c equals (F_c^T F_c + a I)^-1 F_c^T X_c."""
    torch.manual_seed(1)
    f, x = torch.rand(8, 20).double(), torch.randn(8, 3).double()
    lam = 1e-2
    readout = fit_ridge_readout(f, x, f, x, grid=(lam,))
    fc, xc = f - f.mean(0), x - x.mean(0)
    gram = fc.T @ fc
    alpha = lam * gram.trace() / 20
    expected = torch.linalg.solve(gram + alpha * torch.eye(20, dtype=torch.float64), fc.T @ xc)
    assert torch.allclose(readout.R, expected, atol=1e-9)
    assert torch.allclose(readout.c, x.mean(0) - f.mean(0) @ expected, atol=1e-9)


def test_the_ridge_strength_is_the_best_of_the_grid_on_validation_rows():
    torch.manual_seed(2)
    f = torch.randn(120, 30)
    x = f[:, :2] @ torch.randn(2, 5) + 3.0 * torch.randn(120, 5)  # noisy: some ridge helps
    chosen = fit_ridge_readout(f[:60], x[:60], f[60:], x[60:])
    val_fvu = {
        lam: readout_scores(x[60:], fit_ridge_readout(f[:60], x[:60], f[60:], x[60:], (lam,))(f[60:]))["fvu"]
        for lam in RIDGE_GRID
    }
    assert chosen.ridge == min(val_fvu, key=val_fvu.get)
    assert chosen.ridge > min(RIDGE_GRID)


def test_without_validation_rows_a_tenth_of_the_training_rows_chooses():
    torch.manual_seed(3)
    f = torch.rand(100, 4)
    x = f @ torch.randn(4, 2)
    readout = fit_ridge_readout(f, x)
    assert readout.ridge in RIDGE_GRID and readout_scores(x, readout(f))["fvu"] < 1e-6


def test_group_means_by_hand():
    f = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    means, labels = group_means(f, torch.tensor([1, 1, 0]), torch.tensor([7, 7, 2]))
    assert means.tolist() == [[5.0, 5.0], [2.0, 1.0]]  # groups in sorted id order: 2, then 7
    assert labels.tolist() == [0, 1]


def _planted(n: int, seed: int, planted: int = 3, k: int = 10):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    f = torch.rand(n, k, generator=g)
    f[:, planted] = y + 0.1 * torch.rand(n, generator=g)
    return f, y


def test_sparse_probing_picks_the_planted_component():
    f_train, y_train = _planted(200, 0)
    f_test, y_test = _planted(100, 1)
    assert top_k_by_mean_difference(f_train, y_train == 1, 1).tolist() == [3]
    acc = sparse_probe_accuracy(f_train, y_train, f_test, y_test, ks=(1, 2))
    assert set(acc) == {"1", "2"} and acc["1"] == 1.0
    noise_train, noise_test = torch.rand(200, 10), torch.rand(100, 10)
    assert sparse_probe_accuracy(noise_train, y_train, noise_test, y_test, ks=(1,))["1"] < 0.7  # chance: 0.5


def test_sparse_probing_per_document():
    """Rows are noisy; their document's mean is not: per document the planted component separates."""
    g = torch.Generator().manual_seed(0)
    docs = torch.arange(60).repeat_interleave(20)
    y = (docs % 2).long()
    f = torch.rand(len(docs), 5, generator=g)
    f[:, 1] += 0.5 * y  # a shift half the width of the per-row noise
    per_row = sparse_probe_accuracy(f[:600], y[:600], f[600:], y[600:], ks=(1,))
    per_doc = sparse_probe_accuracy(f[:600], y[:600], f[600:], y[600:], (1,), docs[:600], docs[600:])
    assert per_doc["1"] == 1.0 and per_row["1"] < 0.85


def test_sparse_probing_without_usable_labels_is_nan():
    f = torch.rand(10, 3)
    assert math.isnan(sparse_probe_accuracy(f, torch.zeros(10), f, torch.zeros(10), ks=(1,))["1"])


def test_sae_evaluation_reports_every_key():
    f_train, y_train = _planted(200, 0)
    f_val, _ = _planted(50, 1)
    f_test, y_test = _planted(100, 2)
    r = torch.randn(10, 4)
    metrics, readout = sae_evaluation(
        f_train, f_train @ r, f_val, f_val @ r, f_test, f_test @ r, y_train, y_test, ks=(1, 2, 5, 20)
    )
    assert set(metrics) == {
        "l0", "dead_fraction", "fvu", "explained_variance", "cosine", "l2_ratio", "readout_ridge",
        "sparse_probe_accuracy",
    }  # fmt: skip
    assert set(metrics["sparse_probe_accuracy"]) == {"1", "2", "5", "20"}
    assert metrics["fvu"] < 1e-8 and metrics["explained_variance"] > 1 - 1e-8
    assert metrics["dead_fraction"] == 0.0 and metrics["l0"] == pytest.approx(l0([f_train, f_val, f_test]))
    assert readout.state_dict()["R"].shape == (10, 4) and readout.state_dict()["R"].dtype == torch.float32
    no_labels, _ = sae_evaluation(f_train, f_train @ r, f_val, f_val @ r, f_test, f_test @ r, None, None)
    assert "sparse_probe_accuracy" not in no_labels


def test_moments_of_sparse_codes_sum_the_nonzeros_only_and_agree_with_the_dense_sums(monkeypatch):
    from implicit_em.eval import sae_metrics

    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 200, generator=g, dtype=torch.float64)
    values, index = z.topk(6, dim=1)
    f = torch.zeros_like(z).scatter(1, index, values)  # some negative codes too
    f[7] = 0  # a row with no nonzero
    f[11, :150] = torch.randn(150, generator=g, dtype=torch.float64)  # a row far denser than the rest: dense product
    monkeypatch.setattr(sae_metrics, "SPARSE_PAIRS", 2000)  # several blocks of rows
    x = torch.randn(300, 9, generator=g, dtype=torch.float64)
    calls = []
    monkeypatch.setattr(sae_metrics, "_sparse_gram", lambda *a: calls.append(1) or _sparse_gram(*a))
    sparse = sae_metrics._moments(f, x)
    monkeypatch.setattr(sae_metrics, "SPARSE_MOMENTS_DENSITY", 0.0)
    dense = sae_metrics._moments(f, x)
    assert calls and len(calls) == 1  # the sparse sums ran once (one chunk), the dense ones after
    for a, b in zip(sparse, dense):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
