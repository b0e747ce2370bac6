"""Feature evaluation: the fast torch probe against scikit-learn's, and the clustering scores."""

import math

import numpy as np
import pytest
import torch

from implicit_em.eval.probe import (
    cluster_accuracy,
    clustering_scores,
    kmeans_scores,
    linear_probe,
    responsibility_assignments,
    sklearn_probe,
    torch_probe,
    torch_probe_path,
)


@pytest.fixture(scope="module")
def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y)
    return [torch.as_tensor(a) for a in (x_tr, y_tr, x_te, y_te)]


def _mixture(n, d=20, classes=10, seed=0):
    """Overlapping Gaussian classes: a probe problem whose accuracy is far from 0 and from 1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(100)) * 0.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g)
    x = torch.cat([x, x[:, :3] * 2 + 1, torch.full((n, 1), 7.0)], dim=1)  # duplicate and constant features
    return x, y


def test_torch_probe_agrees_with_sklearn_on_raw_digits(digits_split):
    # 540 test images: one prediction is 0.19 points, so "within 0.3 points" means at most one differs
    x_tr, y_tr, x_te, y_te = digits_split
    sk, tp = sklearn_probe(x_tr, y_tr, x_te, y_te), torch_probe(x_tr, y_tr, x_te, y_te)
    assert sk > 0.95
    assert abs(sk - tp) <= 1 / len(y_te) + 1e-12, (sk, tp)


def test_torch_probe_agrees_with_sklearn_on_a_large_synthetic_problem():
    # 20,000 test samples: 0.3 points are 60 predictions, a tolerance with meaning
    x_tr, y_tr = _mixture(20000, seed=1)
    x_te, y_te = _mixture(20000, seed=2)
    sk, tp = sklearn_probe(x_tr, y_tr, x_te, y_te), torch_probe(x_tr, y_tr, x_te, y_te)
    assert 0.4 < sk < 0.95, sk
    assert abs(sk - tp) <= 0.003, (sk, tp)
    # float64 gives the same answer
    assert abs(torch_probe(x_tr, y_tr, x_te, y_te, dtype=torch.float64) - sk) <= 0.003


def test_torch_probe_on_encoder_features_with_dead_components(digits_split):
    # features like a trained model's: ReLU distances, some components constant (dead)
    x_tr, y_tr, x_te, y_te = digits_split
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)) / 8
    f_tr, f_te = torch.relu(x_tr @ w - 1), torch.relu(x_te @ w - 1)
    f_tr[:, :4], f_te[:, :4] = 0.0, 0.0
    sk, tp = sklearn_probe(f_tr, y_tr, f_te, y_te), torch_probe(f_tr, y_tr, f_te, y_te)
    assert sk > 0.8
    assert abs(sk - tp) <= 2 / len(y_te) + 1e-12, (sk, tp)


def test_linear_probe_dispatches_and_takes_numpy(digits_split):
    x_tr, y_tr, x_te, y_te = (a.numpy() for a in digits_split)
    assert linear_probe(x_tr, y_tr, x_te, y_te, "sklearn") == sklearn_probe(x_tr, y_tr, x_te, y_te)
    fast = linear_probe(x_tr, y_tr, x_te, y_te, "torch")
    assert fast == torch_probe(*(torch.as_tensor(a) for a in (x_tr, y_tr, x_te, y_te)))


def test_torch_probe_regularisation_strength_matters(digits_split):
    x_tr, y_tr, x_te, y_te = digits_split
    assert torch_probe(x_tr, y_tr, x_te, y_te, c=1e-5) < torch_probe(x_tr, y_tr, x_te, y_te) - 0.05


def test_cluster_accuracy_and_nmi_by_hand():
    # cluster 0 = {0, 0}: 2 right; cluster 1 = {1, 2}: majority 1 right -> 3/4
    a, y = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2])
    assert cluster_accuracy(a, y) == 0.75
    # H(Y) = 1.5 ln 2, H(A) = ln 2, I(A; Y) = H(Y) - H(Y|A) = 1.5 ln 2 - 0.5 ln 2 = ln 2
    # NMI (arithmetic) = 2 I / (H(A) + H(Y)) = 2 / 2.5 = 0.8
    scores = clustering_scores(a, y)
    assert scores == {"cluster_accuracy": 0.75, "nmi": pytest.approx(0.8, abs=1e-12)}
    # the example written out once more with the entropies
    h_y, h_a, i = 1.5 * math.log(2), math.log(2), math.log(2)
    assert scores["nmi"] == pytest.approx(2 * i / (h_a + h_y))
    # a relabelled perfect clustering; unused cluster ids; an uninformative clustering
    assert clustering_scores(np.array([2, 2, 0, 0, 5]), np.array([0, 0, 1, 1, 2])) == {
        "cluster_accuracy": 1.0,
        "nmi": pytest.approx(1.0),
    }
    assert clustering_scores(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])) == {
        "cluster_accuracy": 0.5,
        "nmi": pytest.approx(0.0, abs=1e-12),
    }
    # one cluster for everything: accuracy is the majority-class share
    assert cluster_accuracy(np.zeros(5, dtype=int), np.array([0, 1, 1, 1, 2])) == 0.6


def test_responsibility_assignments_are_argmin_distance():
    d = torch.tensor([[[3.0, 1.0, 2.0], [0.5, 0.5, 4.0], [9.0, 8.0, 7.0]]])
    assert responsibility_assignments(d).tolist() == [[1, 0, 2]]  # the tie goes to the lowest index


def test_relu_ties_go_to_the_smallest_pre_activation():
    z = torch.tensor([[-1.0, -3.0, 2.0, -2.0], [1.0, 0.5, 2.0, 3.0]])
    d = torch.relu(z)  # row 0 ties at 0 for components 0, 1, 3; row 1 has a unique minimum
    assert responsibility_assignments(d).tolist() == [0, 1]
    assert responsibility_assignments(d, z).tolist() == [1, 1]
    # a strictly monotone activation has no ties: the pre-activations change nothing
    soft = torch.nn.functional.softplus(z)
    assert torch.equal(responsibility_assignments(soft, z), responsibility_assignments(soft))


def test_kmeans_scores_runs_and_returns_keys():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    y = torch.arange(3).repeat(40)
    x = centres[y] + 0.3 * torch.randn(120, 2, generator=g)
    scores = kmeans_scores(x[:60], x[60:], y[60:], n_clusters=3)
    assert set(scores) == {"kmeans_cluster_accuracy", "kmeans_nmi"}
    assert scores["kmeans_cluster_accuracy"] == 1.0 and scores["kmeans_nmi"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in scores.values())


def test_torch_probe_restores_the_thread_setting(digits_split):
    # a few hundred rows and a loose tolerance pose the same question (on 2 threads of busy cores each step is slow)
    x_tr, y_tr, x_te, y_te = (t[:400] for t in digits_split)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        one = torch_probe(x_tr, y_tr, x_te, y_te, cpu_threads=1, tol=1e-2)
        assert torch.get_num_threads() == 2
        assert torch_probe(x_tr, y_tr, x_te, y_te, cpu_threads=None, tol=1e-2) == pytest.approx(
            one, abs=1 / len(y_te) + 1e-12
        )
    finally:
        torch.set_num_threads(before)


def test_probe_speed_benchmark_smoke(tmp_path):
    """benchmarks/probe_speed.py through its main (in this process): both probes' accuracies, close to each
    other, and the speed ratio on the last line, after training through the project's CLI."""
    from implicit_em.run.runtime import training_process
    from tests.conftest import REPO, script_in_process

    with training_process():  # what the fit sets in the process (environment variables, threads) is undone
        run = script_in_process(
            REPO / "benchmarks" / "probe_speed.py",
            "--data", "digits", "--epochs", "1", "--repeats", "1", "--root_dir", str(tmp_path / "runs"),
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    accuracies = [float(ln.split("accuracy")[1].split()[0]) for ln in lines if " probe" in ln and "accuracy" in ln]
    assert len(accuracies) == 2 and all(0.5 < a <= 1 for a in accuracies), run.stdout
    assert abs(accuracies[0] - accuracies[1]) <= 0.01
    assert lines[-1].startswith("speed ratio (sklearn / torch): ") and lines[-1].endswith("x")
    assert float(lines[-1].split(": ")[1].rstrip("x")) > 0
    assert list((tmp_path / "runs").glob("**/metrics.json"))  # trained through the project's CLI


def test_sklearn_probe_leaves_the_blas_thread_setting_alone(digits_split):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas")

    before = blas_threads()
    assert sklearn_probe(*digits_split) > 0.95
    assert blas_threads() == before


def _random_features(x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """ReLU features of k random directions: an overcomplete code like a wide dictionary's."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, x.shape[1], generator=g) / x.shape[1] ** 0.5
    return torch.relu(x @ w.T + 0.5 * torch.randn(k, generator=g))


def test_sample_and_feature_space_designs_pose_the_same_problem(digits_split):
    """For matching parameters both designs give the same training logits and the same penalty
    ||W||^2 on the standardised features; the sample-space one has r <= n columns instead of K."""
    from implicit_em.eval.probe import _feature_space_design, _mean_and_std, _sample_space_design

    f = _random_features(digits_split[0][:300] / 16, 400).double()
    f[:, 3] = 2.0  # a constant feature
    mean, std = _mean_and_std(f)
    z = (f - mean) / std
    g = torch.Generator().manual_seed(0)
    for design in (_sample_space_design, _feature_space_design):
        x, penalty, to_features = design(f, mean, std, torch.float64)
        v = torch.randn(x.shape[1] - 1, 10, generator=g, dtype=torch.float64)
        weight = to_features(v)  # on f; on z it is std * weight
        assert torch.allclose(f @ weight - mean @ weight, x[:, :-1] @ v, atol=1e-8)
        assert (penalty * v.pow(2).sum(1)).sum().item() == pytest.approx(
            (std[:, None] * weight).pow(2).sum().item(), rel=1e-8
        )
        assert torch.allclose(x[:, -1], torch.ones(300, dtype=torch.float64))
    assert _sample_space_design(f, mean, std, torch.float64)[0].shape[1] <= 301
    assert torch.linalg.matrix_rank(z).item() == _sample_space_design(f, mean, std, torch.float64)[0].shape[1] - 1


def test_sample_space_probe_reaches_the_feature_space_optimum(digits_split):
    # K = 400 features > 300 training rows: both designs are affordable; with a firm penalty (C = 0.05)
    # both solve to a tight tolerance in a few hundred steps and must predict alike
    x_tr, y_tr, x_te, y_te = digits_split
    x_tr, y_tr = x_tr[:300], y_tr[:300]
    f_tr, f_te = _random_features(x_tr / 16, 400), _random_features(x_te / 16, 400)
    kw = {"c": 0.05, "tol": 1e-5, "dtype": torch.float64, "cpu_threads": 1}
    dual = torch_probe(f_tr, y_tr, f_te, y_te, space="samples", **kw)
    primal = torch_probe(f_tr, y_tr, f_te, y_te, space="features", **kw)
    assert dual > 0.9
    assert abs(dual - primal) <= 1 / len(y_te) + 1e-12, (dual, primal)
    with pytest.raises(ValueError, match="space"):
        torch_probe(f_tr, y_tr, f_te, y_te, space="dual")


def test_torch_probe_at_16384_features_on_digits_in_bounded_memory(digits_split):
    import resource

    x_tr, y_tr, x_te, y_te = digits_split
    f_tr, f_te = _random_features(x_tr / 16, 16384, seed=1), _random_features(x_te / 16, 16384, seed=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    acc = torch_probe(f_tr, y_tr, f_te, y_te, cpu_threads=1)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert acc > 0.9
    assert grown_mb < 600, grown_mb  # the K x K covariance alone would be 1,074 MB in float32


def test_unwhitened_feature_space_probe_reaches_the_same_optimum(monkeypatch):
    import implicit_em.eval.probe as probe

    x_tr, y_tr = _mixture(3000, seed=1)
    x_te, y_te = _mixture(3000, seed=2)
    whitened = torch_probe(x_tr, y_tr, x_te, y_te, tol=1e-6, dtype=torch.float64)
    monkeypatch.setattr(probe, "WHITEN_MAX", 8)  # 24 features: now without the K x K whitening
    plain = torch_probe(x_tr, y_tr, x_te, y_te, tol=1e-6, dtype=torch.float64)
    assert 0.4 < plain < 0.95
    assert abs(plain - whitened) <= 2 / len(y_te) + 1e-12, (plain, whitened)


def test_kmeans_is_skipped_with_a_reason_when_k_is_too_large():
    x = torch.rand(50, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(50) % 3
    out = kmeans_scores(x, x, y, n_clusters=16384)
    assert out == {"kmeans_skipped": "K = 16384 exceeds the 50 training samples"}
    out = kmeans_scores(x, x, y, n_clusters=20, max_clusters=10)
    assert set(out) == {"kmeans_skipped"} and "max_clusters = 10" in out["kmeans_skipped"]
    assert set(kmeans_scores(x, x, y, n_clusters=50)) == {"kmeans_cluster_accuracy", "kmeans_nmi"}  # K = n fits


def test_the_probe_path_gives_each_cs_own_probe(digits_split):
    """One whitening, warm-started solves in increasing C: each accuracy is the lone probe's at that C."""
    x_tr, y_tr, x_te, y_te = (torch.as_tensor(a) for a in digits_split)
    path = torch_probe_path(x_tr, y_tr, x_te, y_te, (1.0, 1e-4, 0.01))
    assert list(path) == [1e-4, 0.01, 1.0]
    for c, accuracy in path.items():
        assert abs(accuracy - torch_probe(x_tr, y_tr, x_te, y_te, c=c)) <= 0.004, c
    assert path[1e-4] < path[1.0] - 0.05
