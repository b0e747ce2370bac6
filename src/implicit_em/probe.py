"""Feature evaluation independent of the loss: linear probes and clustering scores.

The paper's protocol is :func:`sklearn_probe` (StandardScaler, then LogisticRegression with lbfgs and
max_iter 5000, fit on train, scored on test). :func:`torch_probe` solves the same L2-regularised
multinomial logistic regression full-batch with L-BFGS on the features' device, many times faster.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

PROBE_METHODS = ("sklearn", "torch")


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


def sklearn_probe(f_train, y_train, f_test, y_test, max_iter: int = 5000) -> float:
    """Test accuracy of StandardScaler + LogisticRegression(lbfgs, C=1) fit on the training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    clf.fit(_numpy(f_train), _numpy(y_train))
    return float(clf.score(_numpy(f_test), _numpy(y_test)))


def torch_probe(
    f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, c: float = 1.0, max_iter: int = 1000
) -> float:
    """The same model as :func:`sklearn_probe`, solved in float64 with torch's L-BFGS.

    Minimises sum_i CE(softmax(V z_i + a), y_i) + ||V||_F^2 / (2C) over standardised features z
    (StandardScaler: train mean and population std, constant features left unscaled); a unpenalised.
    """
    f_train, f_test = f_train.detach().double(), f_test.detach().double()
    y_train, y_test = y_train.to(f_train.device).long(), y_test.to(f_test.device).long()
    mean, std = f_train.mean(0), f_train.std(0, unbiased=False)
    std = torch.where(std < 1e-12, torch.ones_like(std), std)
    z_train, z_test = (f_train - mean) / std, (f_test - mean) / std
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    weight = torch.zeros(z_train.shape[1], n_classes, dtype=torch.float64, device=z_train.device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, device=z_train.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-7, tolerance_change=1e-12,
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z_train @ weight + bias, y_train, reduction="sum")
        loss = loss + weight.pow(2).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((z_test @ weight + bias).argmax(1) == y_test).double().mean())


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


def responsibility_assignments(d: Tensor) -> Tensor:
    """Hard EM assignment of each input: argmax_j r_ij = argmin_j d_ij (ties go to the lowest index)."""
    return d.argmin(dim=-1)


def kmeans_scores(x_train, x_test, y_test, n_clusters: int, seed: int = 0) -> dict[str, float]:
    """scikit-learn KMeans with K clusters fitted on raw training inputs, scored on the test inputs."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit(_numpy(x_train))
    scores = clustering_scores(km.predict(_numpy(x_test)), y_test)
    return {"kmeans_" + k: v for k, v in scores.items()}
