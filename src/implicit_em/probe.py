"""Feature evaluation independent of the loss: linear probes and clustering scores.

The paper's protocol is :func:`sklearn_probe` (StandardScaler, then LogisticRegression with lbfgs and
max_iter 5000, fit on train, scored on test). :func:`torch_probe` solves the same L2-regularised
multinomial logistic regression full-batch with L-BFGS on the features' device, many times faster
(``benchmarks/probe_speed.py`` measures both).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

PROBE_METHODS = ("sklearn", "torch")
#: samples per feature from which the torch probe warm-starts from a subsample and stops at 1e-3
WARM_START_MIN = 512


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


def sklearn_probe(f_train, y_train, f_test, y_test, max_iter: int = 5000) -> float:
    """Test accuracy of StandardScaler + LogisticRegression(lbfgs, C=1) fit on the training features.

    BLAS runs on one thread: the solver's matrix products are small, and multi-threaded OpenBLAS made the
    same fit 40x slower (53 s instead of 1.4 s, Fashion-MNIST features) on two cores busy with other work.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit(_numpy(f_train), _numpy(y_train))
        return float(clf.score(_numpy(f_test), _numpy(y_test)))


def torch_probe(
    f_train: Tensor,
    y_train: Tensor,
    f_test: Tensor,
    y_test: Tensor,
    c: float = 1.0,
    max_iter: int = 5000,
    tol: float | None = None,
    dtype: torch.dtype = torch.float32,
    cpu_threads: int | None = None,
) -> float:
    """The same model as :func:`sklearn_probe`, solved with torch's L-BFGS on the features' device.

    Minimises (1/n) sum_i CE(softmax(W z_i + a), y_i) + ||W||_F^2 / (2Cn) over standardised features z
    (StandardScaler: train mean and population std, constant features left unscaled; a unpenalised):
    scikit-learn's objective and scaling. It stops when max |gradient| <= ``tol``. By default that is
    scikit-learn's 1e-4, or 3e-4 when there are at least 512 samples per feature: there the looser
    tolerance agrees with scikit-learn's accuracy to about 0.1 point (Fashion-MNIST features,
    ``benchmarks/probe_speed.py``) at a third of the iterations, while on small problems (raw digits)
    it can move a few test predictions. What makes it fast: the solver works
    on whitened features (W = T V with T^T Cov(z) T ~ I), starts from the solution on a random eighth of
    the samples when there are many, writes the gradient out (no autograd), and holds the features in
    ``dtype`` (float32 halves the memory traffic of the two matmuls per evaluation).

    On a CPU the solve runs on ``cpu_threads`` threads (None: torch's setting). Pass 1 when the cores are
    shared with other busy processes: each small op's thread barrier then costs a time slice (30x slower
    was measured on 2 oversubscribed cores); on idle cores 2 threads were 1.5x faster than 1.
    """
    if f_train.device.type == "cpu" and cpu_threads is not None and cpu_threads != torch.get_num_threads():
        previous = torch.get_num_threads()
        torch.set_num_threads(cpu_threads)
        try:
            return torch_probe(f_train, y_train, f_test, y_test, c, max_iter, tol, dtype, None)
        finally:
            torch.set_num_threads(previous)
    f_train, f_test = f_train.detach().to(dtype), f_test.detach().to(dtype)
    y_train, y_test = y_train.to(f_train.device).long(), y_test.to(f_test.device).long()
    n, k = f_train.shape
    # one pass of statistics: mean, population std, and the covariance of the standardised features
    mean = f_train.mean(0, dtype=torch.float64)
    second = (f_train.T @ f_train).double() / n - torch.outer(mean, mean)
    std = second.diagonal().clamp_min(0).sqrt()
    std = torch.where(std < 1e-6 * std.max().clamp_min(1e-12), torch.ones_like(std), std)
    cov = second / torch.outer(std, std)
    # whitening T = U diag(lambda^-1/2) of Cov(z) = U diag(lambda) U^T; near-null directions (constant or
    # duplicate features) are scaled like lambda_max / 1e4 so T stays well conditioned
    lam, u = torch.linalg.eigh(cov)
    t = u / lam.clamp_min(1e-4 * float(lam.max().clamp_min(1e-12))).sqrt()
    # x_i = [z_i T, 1] with z = (f - mean) / std, as one matmul: f A - mean A, A = diag(1/std) T
    a = t / std.unsqueeze(1)
    x = torch.cat([f_train @ a.to(dtype) - (mean @ a).to(dtype), f_train.new_ones(n, 1)], dim=1)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    onehot = torch.nn.functional.one_hot(y_train, n_classes).to(dtype)
    gram = t.T @ t  # ||W||^2 = tr(V^T T^T T V)
    params = torch.zeros(k + 1, n_classes, dtype=dtype, device=x.device, requires_grad=True)
    large = n >= WARM_START_MIN * (k + 1)
    tol = tol if tol is not None else 3e-4 if large else 1e-4
    # warm start: the same problem on a random eighth of the samples costs an eighth per iteration and
    # lands close to the full optimum, so the full solve needs far fewer (expensive) iterations
    if large:
        sub = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 8].to(x.device)
        _lbfgs(params, x[sub], onehot[sub], gram, c, max_iter, tol, dtype)
    _lbfgs(params, x, onehot, gram, c, max_iter, tol, dtype)
    with torch.no_grad():
        v = params.detach().double()
        weight = a @ v[:k]  # logits = ((f - mean) / std) T V + b = f (A V) - mean (A V) + b
        bias = v[k] - mean @ weight
        return float(((f_test @ weight.to(dtype) + bias.to(dtype)).argmax(1) == y_test).double().mean())


def _lbfgs(params: Tensor, x: Tensor, onehot: Tensor, gram: Tensor, c: float, max_iter: int, tol: float, dtype) -> None:
    """L-BFGS on (1/n) sum_i CE(softmax(x_i [V; a]), y_i) + tr(V^T gram V) / (2Cn), from ``params``."""
    n, k1 = x.shape
    x_t = x.T.to(dtype).contiguous()  # (k + 1) x n: logits are computed class-major, reductions are contiguous
    x_y = (x.T @ onehot).to(dtype)  # sum_i x_i onehot(y_i)^T: the linear part of the loss, computed once
    q = torch.zeros(k1, k1, dtype=torch.float64, device=x.device)
    q[:-1, :-1] = gram / (c * n)  # the bias (last row) is not penalised
    q = q.to(dtype)
    opt = torch.optim.LBFGS(
        [params], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
        tolerance_grad=tol, tolerance_change=1e-12,
    )  # fmt: skip

    @torch.no_grad()
    def closure():
        logits = params.T @ x_t  # classes x n
        lse = torch.logsumexp(logits, dim=0)
        penalty = q @ params
        loss = (lse.sum() - (params * x_y).sum()) / n + (params * penalty).sum() / 2
        probs = logits.sub_(lse).exp_()
        params.grad = (x_t @ probs.T - x_y) / n + penalty  # X^T (softmax - onehot) / n + q [V; a]
        return loss

    opt.step(closure)


def linear_probe(f_train, y_train, f_test, y_test, method: str = "sklearn") -> float:
    """Probe accuracy by ``method`` ('sklearn': the paper's protocol; 'torch': the fast solver)."""
    if method == "sklearn":
        return sklearn_probe(f_train, y_train, f_test, y_test)
    return torch_probe(
        torch.as_tensor(f_train), torch.as_tensor(y_train), torch.as_tensor(f_test), torch.as_tensor(y_test)
    )


def cluster_accuracy(assignments, labels) -> float:
    """Accuracy when every cluster predicts the majority class of its members (on the same split)."""
    a, y = _numpy(assignments).astype(np.int64), _numpy(labels).astype(np.int64)
    counts = np.zeros((a.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(counts, (a, y), 1)
    return float(counts.max(axis=1).sum() / len(a))


def clustering_scores(assignments, labels) -> dict[str, float]:
    """Cluster accuracy and normalised mutual information (scikit-learn's NMI) of hard assignments."""
    from sklearn.metrics import normalized_mutual_info_score

    a, y = _numpy(assignments), _numpy(labels)
    return {"cluster_accuracy": cluster_accuracy(a, y), "nmi": float(normalized_mutual_info_score(y, a))}


def responsibility_assignments(d: Tensor, pre_activation: Tensor | None = None) -> Tensor:
    """Hard EM assignment of each input: argmax_j r_ij = argmin_j d_ij.

    With ReLU many components tie at d = 0 (often dozens per input). Given the pre-activations z
    (d = phi(z)), ties go to the smallest z: the assignment in the limit of a sharp softplus, whose
    distances have no ties. Without z, ties go to the lowest index.
    """
    if pre_activation is None:
        return d.argmin(dim=-1)
    tied = d <= d.amin(dim=-1, keepdim=True)
    return pre_activation.masked_fill(~tied, float("inf")).argmin(dim=-1)


def kmeans_scores(x_train, x_test, y_test, n_clusters: int, seed: int = 0) -> dict[str, float]:
    """scikit-learn KMeans with K clusters fitted on raw training inputs, scored on the test inputs."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit(_numpy(x_train))
    scores = clustering_scores(km.predict(_numpy(x_test)), y_test)
    return {"kmeans_" + k: v for k, v in scores.items()}
