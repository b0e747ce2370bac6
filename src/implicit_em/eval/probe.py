"""Feature evaluation independent of the loss: linear probes and clustering scores.

The paper's protocol is :func:`sklearn_probe` (StandardScaler, then LogisticRegression with lbfgs and
max_iter 5000, fit on train, scored on test). :func:`torch_probe` solves the same L2-regularised
multinomial logistic regression full-batch with L-BFGS on the features' device, many times faster
(``benchmarks/probe_speed.py`` measures both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

PROBE_METHODS = ("sklearn", "torch")
#: samples per feature from which the torch probe warm-starts from a subsample and stops at 1e-3
WARM_START_MIN = 512
#: above this many features (and fewer than the samples) the torch probe does not whiten (no K x K eigh, 512 MB
#: in float64 at the limit). Whitening is what makes L-BFGS fast: CIFAR-10 patch features (45,000 x 6,400), C = 1,
#: 94 s whitened against about 10 minutes on the raw standardised features
WHITEN_MAX = 8192
#: float64 values in one block of columns that the probe converts at a time (32 MB)
BLOCK_ELEMENTS = 1 << 22
#: above this many clusters the KMeans baseline is skipped (each k-means++ and Lloyd pass costs n K D)
KMEANS_MAX_CLUSTERS = 4096


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
    space: str = "auto",
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

    ``space`` picks where the problem is posed ('auto': the smaller side). 'features': whitening from the
    K x K covariance (K <= ``WHITEN_MAX``; above, L-BFGS on z itself, no K x K matrix). 'samples' (auto
    when K >= n): the optimal W lies in the span of the n training rows (the penalty grows off it), so
    with z = U S V^T (from the n x n matrix z z^T) the problem is the same one on the r <= n coordinates
    z V = U S, solved exactly as above: memory n x K + n^2 and time n^2 K, at any K.

    On a CPU the solve runs on ``cpu_threads`` threads (None: torch's setting). Pass 1 when the cores are
    shared with other busy processes: each small op's thread barrier then costs a time slice (30x slower
    was measured on 2 oversubscribed cores); on idle cores 2 threads were 1.5x faster than 1.
    """
    return torch_probe_path(f_train, y_train, f_test, y_test, (c,), max_iter, tol, dtype, cpu_threads, space)[c]


def torch_probe_path(
    f_train: Tensor,
    y_train: Tensor,
    f_test: Tensor,
    y_test: Tensor,
    cs: Sequence[float],
    max_iter: int = 5000,
    tol: float | None = None,
    dtype: torch.dtype = torch.float32,
    cpu_threads: int | None = None,
    space: str = "auto",
) -> dict[float, float]:
    """:func:`torch_probe`'s test accuracy at each C in ``cs``: ``{C: accuracy}``. The standardisation and
    whitening (most of the time at thousands of features) are computed once, and each C's solve starts from
    the solution at the previous, smaller C; every solve still stops only at ``tol``, so each accuracy is the
    one :func:`torch_probe` gives at that C."""
    if space not in ("auto", "features", "samples"):
        raise ValueError(f"space must be 'auto', 'features' or 'samples', got {space!r}")
    if f_train.device.type == "cpu" and cpu_threads is not None and cpu_threads != torch.get_num_threads():
        previous = torch.get_num_threads()
        torch.set_num_threads(cpu_threads)
        try:
            return torch_probe_path(f_train, y_train, f_test, y_test, cs, max_iter, tol, dtype, None, space)
        finally:
            torch.set_num_threads(previous)
    f_train, f_test = f_train.detach().to(dtype), f_test.detach().to(dtype)
    y_train, y_test = y_train.to(f_train.device).long(), y_test.to(f_test.device).long()
    n, k = f_train.shape
    mean, std = _mean_and_std(f_train)
    if space == "samples" or (space == "auto" and k >= n):
        x, gram, to_features = _sample_space_design(f_train, mean, std, dtype)
    else:
        x, gram, to_features = _feature_space_design(f_train, mean, std, dtype)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    onehot = torch.nn.functional.one_hot(y_train, n_classes).to(dtype)
    params = torch.zeros(x.shape[1], n_classes, dtype=dtype, device=x.device, requires_grad=True)
    large = n >= WARM_START_MIN * x.shape[1]
    tol = tol if tol is not None else 3e-4 if large else 1e-4
    # warm start: the same problem on a random eighth of the samples costs an eighth per iteration and
    # lands close to the full optimum, so the full solve needs far fewer (expensive) iterations
    # (the first C only: each later C starts from the previous one's full solution)
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 8].to(x.device) if large else None
    accuracy = {}
    for c in sorted(cs):
        if sub is not None and not accuracy:
            _lbfgs(params, x[sub], onehot[sub], gram, c, max_iter, tol, dtype)
        _lbfgs(params, x, onehot, gram, c, max_iter, tol, dtype)
        with torch.no_grad():
            v = params.detach().double()
            weight = to_features(v[:-1])  # K x C on the raw features: logits = f weight + bias
            bias = v[-1] - mean @ weight
            logits = f_test @ weight.to(dtype) + bias.to(dtype)
            accuracy[c] = float((logits.argmax(1) == y_test).double().mean())
    return accuracy


def _column_blocks(f: Tensor) -> list[slice]:
    cols = max(1, BLOCK_ELEMENTS // max(f.shape[0], 1))
    return [slice(j, j + cols) for j in range(0, f.shape[1], cols)]


def _mean_and_std(f: Tensor) -> tuple[Tensor, Tensor]:
    """Column mean and population std in float64, a block of columns at a time; constant columns
    (std below 1e-6 of the largest) get std 1, as StandardScaler leaves them unscaled."""
    parts = [torch.var_mean(f[:, cols].double(), dim=0, correction=0) for cols in _column_blocks(f)]
    var, mean = (torch.cat(t) for t in zip(*parts))
    std = var.clamp_min(0).sqrt()
    return mean, torch.where(std < 1e-6 * std.max().clamp_min(1e-12), torch.ones_like(std), std)


def _feature_space_design(f: Tensor, mean: Tensor, std: Tensor, dtype) -> tuple[Tensor, Tensor, Callable]:
    """x = [z T, 1] with T the whitening of Cov(z) (K <= WHITEN_MAX; else T = I), the diagonal of the
    penalty matrix T^T T, and the map from the solution V to the weights on f: A V, A = diag(1/std) T."""
    n, k = f.shape
    if k > WHITEN_MAX:
        inv_std = (1 / std).unsqueeze(1)
        x = torch.cat([(f - mean.to(dtype)) * inv_std.T.to(dtype), f.new_ones(n, 1)], dim=1)
        return x, torch.ones(k, dtype=torch.float64, device=f.device), lambda v: v * inv_std
    second = (f.T @ f).double() / n - torch.outer(mean, mean)
    cov = second / torch.outer(std, std)
    # whitening T = U diag(lambda^-1/2) of Cov(z) = U diag(lambda) U^T; near-null directions (constant or
    # duplicate features) are scaled like lambda_max / 1e4 so T stays well conditioned
    lam, u = torch.linalg.eigh(cov)
    lam = lam.clamp_min(1e-4 * float(lam.max().clamp_min(1e-12)))
    t = u / lam.sqrt()
    # x_i = [z_i T, 1] with z = (f - mean) / std, as one matmul: f A - mean A, A = diag(1/std) T
    a = t / std.unsqueeze(1)
    x = torch.cat([f @ a.to(dtype) - (mean @ a).to(dtype), f.new_ones(n, 1)], dim=1)
    return x, 1 / lam, lambda v: a @ v  # ||W||^2 = tr(V^T T^T T V), T^T T = diag(1 / lambda)


def _sample_space_design(f: Tensor, mean: Tensor, std: Tensor, dtype) -> tuple[Tensor, Tensor, Callable]:
    """The problem in the span of the training rows: with z z^T / n = U diag(mu) U^T, z = U S V^T and
    W = V_r B, so z W = U_r sqrt(n mu_r) B and ||W|| = ||B||. Whitened as in feature space:
    x = [U_r sqrt(n mu_r / max(mu_r, floor)), 1], penalty diag(1 / max(mu_r, floor)); back on f,
    W = z^T U_r diag(1 / sqrt(n mu_r max(mu_r, floor))) V / std. Directions with mu below 1e-10 of the
    largest (the null space, and rounding) are dropped: they carry no signal."""
    n = f.shape[0]
    blocks = _column_blocks(f)
    mean, std = mean.to(dtype), std.to(dtype)

    def z_block(cols: slice) -> Tensor:
        return ((f[:, cols] - mean[cols]) / std[cols]).double()

    kernel = torch.zeros(n, n, dtype=torch.float64, device=f.device)
    for cols in blocks:
        zb = z_block(cols)
        kernel += zb @ zb.T
    mu, u = torch.linalg.eigh(kernel / n)
    keep = mu > 1e-10 * float(mu.max().clamp_min(1e-300))
    mu, u = mu[keep], u[:, keep]
    floored = mu.clamp_min(1e-4 * float(mu.max()))
    x = torch.cat([(u * (n * mu / floored).sqrt()).to(dtype), f.new_ones(n, 1)], dim=1)
    coef = u / (n * mu * floored).sqrt()  # n x r

    def to_features(v: Tensor) -> Tensor:
        cv = coef @ v
        return torch.cat([z_block(cols).T @ cv for cols in blocks]) / std.double().unsqueeze(1)

    return x, 1 / floored, to_features


def _lbfgs(
    params: Tensor, x: Tensor, onehot: Tensor, penalty: Tensor, c: float, max_iter: int, tol: float, dtype
) -> None:
    """L-BFGS on (1/n) sum_i CE(softmax(x_i [V; a]), y_i) + sum_k penalty_k ||V_k||^2 / (2Cn), from
    ``params`` (the penalty is diagonal in every design above)."""
    n, k1 = x.shape
    x_t = x.T.to(dtype).contiguous()  # (k + 1) x n: logits are computed class-major, reductions are contiguous
    x_y = (x.T @ onehot).to(dtype)  # sum_i x_i onehot(y_i)^T: the linear part of the loss, computed once
    q = torch.zeros(k1, 1, dtype=torch.float64, device=x.device)
    q[:-1, 0] = penalty / (c * n)  # the bias (last row) is not penalised
    q = q.to(dtype)
    opt = torch.optim.LBFGS(
        [params], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
        tolerance_grad=tol, tolerance_change=1e-12,
    )  # fmt: skip

    @torch.no_grad()
    def closure():
        logits = params.T @ x_t  # classes x n
        lse = torch.logsumexp(logits, dim=0)
        penalised = q * params
        loss = (lse.sum() - (params * x_y).sum()) / n + (params * penalised).sum() / 2
        probs = logits.sub_(lse).exp_()
        params.grad = (x_t @ probs.T - x_y) / n + penalised  # X^T (softmax - onehot) / n + q [V; a]
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


def kmeans_scores(
    x_train, x_test, y_test, n_clusters: int, seed: int = 0, max_clusters: int = KMEANS_MAX_CLUSTERS
) -> dict[str, float | str]:
    """scikit-learn KMeans with K clusters fitted on raw training inputs, scored on the test inputs.

    Returns ``{"kmeans_skipped": reason}`` instead when K exceeds the training samples (KMeans cannot
    fit) or ``max_clusters`` (its time grows as n K D per pass).
    """
    from sklearn.cluster import KMeans

    n = len(x_train)
    if n_clusters > n:
        return {"kmeans_skipped": f"K = {n_clusters} exceeds the {n} training samples"}
    if n_clusters > max_clusters:
        return {"kmeans_skipped": f"K = {n_clusters} exceeds max_clusters = {max_clusters} (time grows as n K D)"}
    km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit(_numpy(x_train))
    scores = clustering_scores(km.predict(_numpy(x_test)), y_test)
    return {"kmeans_" + k: v for k, v in scores.items()}
