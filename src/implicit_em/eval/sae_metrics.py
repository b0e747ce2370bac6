"""What sparse-autoencoder users read: L0, dead fraction, component density, a fitted linear readout's
reconstruction (FVU, explained variance, cosine, norm ratio) and k-sparse probing. Pure functions on tensors.

Features f (N x K) are whatever a model gives per input: distances d for the decoder-free model, codes a for
an SAE, projections for PCA. A decoder-free model has no decoder, so reconstruction is judged through a ridge
readout x ~ f R + c fitted after training on training rows; every baseline gets the same readout, so the
comparison does not favour the model without a decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: a component is active on an input when |f_ij| > 0.01 (the paper's L0 threshold)
ACTIVE_THRESHOLD = 0.01
#: ridge strengths tried, relative to the mean eigenvalue of the centred Gram matrix (scale-free)
RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SPARSE_PROBE_KS = (1, 2, 5, 20)
#: rows per chunk in the float64 accumulations (bounds the extra memory to chunk x K float64)
CHUNK = 8192

Features = Tensor | Sequence[Tensor]


def _parts(f: Features) -> list[Tensor]:
    return [f] if isinstance(f, Tensor) else list(f)


# -- activity ---------------------------------------------------------------------------------------------
def firing_frequency(f: Features, threshold: float = ACTIVE_THRESHOLD) -> Tensor:
    """p_j = (1/N) sum_i [|f_ij| > threshold], per component (float64, K). ``f``: N x K, or several such
    tensors counted as one window (no concatenation)."""
    parts = _parts(f)
    counts = sum((p.abs() > threshold).sum(0, dtype=torch.float64) for p in parts)
    return counts / max(sum(len(p) for p in parts), 1)


def l0(f: Features, threshold: float = ACTIVE_THRESHOLD) -> float:
    """L0 = (1/N) sum_i #{j : |f_ij| > threshold}, the mean number of active components per row (= sum_j p_j)."""
    return float(firing_frequency(f, threshold).sum())


def dead_fraction(f: Features, threshold: float = ACTIVE_THRESHOLD) -> float:
    """(1/K) #{j : p_j = 0}: the fraction of components never active over the rows of ``f`` (the window)."""
    return float((firing_frequency(f, threshold) == 0).double().mean())


def log10_density(f: Features, threshold: float = ACTIVE_THRESHOLD, eps: float = 1e-10) -> Tensor:
    """log10(p_j + eps) per component: the density histogram's values (SAELens's convention, so a
    dead component sits at -10)."""
    return torch.log10(firing_frequency(f, threshold) + eps)


def write_density_histogram(log_density: Tensor, path: str | Path, title: str = "", bins: int = 50) -> Path:
    """A PNG histogram of log10 firing frequencies. Uses matplotlib's object API (no pyplot, no backend
    switch), so the caller's process is left as it was."""
    from matplotlib.figure import Figure

    values = np.asarray(log_density.detach().cpu().double())
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(values, bins=bins, color="#3b6ea5")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("components")
    ax.yaxis.get_major_locator().set_params(integer=True)
    dead = int((values <= -9.999).sum())
    ax.set_title(f"{title + ': ' if title else ''}{len(values)} components, {dead} never active", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# -- the ridge readout ------------------------------------------------------------------------------------
@dataclass
class Readout:
    """x_hat = f R + c (R: K x D, c: D, float64), and the relative ridge strength it was fitted with."""

    R: Tensor
    c: Tensor
    ridge: float

    def __call__(self, f: Tensor) -> Tensor:
        """x_hat in the readout's dtype (float64); call ``.float()`` for float32."""
        return torch.cat([chunk.to(self.R) @ self.R + self.c for chunk in f.split(CHUNK)]) if len(f) else f

    def state_dict(self) -> dict[str, Tensor]:
        """``{"R": K x D, "c": D}`` as float32, the tensors ``readout.safetensors`` holds."""
        return {"R": self.R.float().contiguous().cpu(), "c": self.c.float().contiguous().cpu()}


#: below this fraction of nonzero codes, :func:`_moments` sums F^T F over the nonzeros only
SPARSE_MOMENTS_DENSITY = 0.05


#: most pair products :func:`_sparse_gram` holds at once (float64: 128 MB)
SPARSE_PAIRS = 2**24


def _sparse_gram(fc: Tensor, ff: Tensor) -> None:
    """ff += F^T F for a chunk of sparse codes, from its nonzeros: each row's m largest |f| (m the most nonzeros
    in a row; its nonzeros, and zeros) give the m^2 products f_ij f_il, added at (j, l): cost rows m^2 instead of
    rows K^2. Rows with more than twice the mean count of nonzeros (and 32) go through the dense product, and the
    rest in blocks of at most ``SPARSE_PAIRS`` products, so thresholded codes whose L0 varies from row to row
    (a few rows with hundreds) stay within memory."""
    k = fc.shape[1]
    nnz = (fc != 0).sum(1)
    heavy = nnz > max(32, 2 * float(nnz.float().mean()))
    if bool(heavy.any()):
        ff += fc[heavy].T @ fc[heavy]
        fc, nnz = fc[~heavy], nnz[~heavy]
    m = int(nnz.max()) if len(nnz) else 0
    if m == 0:
        return
    for rows in fc.split(max(SPARSE_PAIRS // (m * m), 1)):
        index = rows.abs().topk(m, dim=1).indices
        values = rows.gather(1, index)
        keys = (index.unsqueeze(-1) * k + index.unsqueeze(-2)).reshape(-1)
        ff.view(-1).index_add_(0, keys, (values.unsqueeze(-1) * values.unsqueeze(-2)).reshape(-1))


def _moments(f: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Column means of f and x, F_c^T F_c and F_c^T X_c, accumulated in float64 over row chunks (F^T F over the
    nonzeros only where fewer than ``SPARSE_MOMENTS_DENSITY`` of the codes are nonzero: TopK codes)."""
    n, k = f.shape
    dev = f.device
    sf = torch.zeros(k, dtype=torch.float64, device=dev)
    sx = torch.zeros(x.shape[1], dtype=torch.float64, device=dev)
    ff = torch.zeros(k, k, dtype=torch.float64, device=dev)
    fx = torch.zeros(k, x.shape[1], dtype=torch.float64, device=dev)
    sparse = n > 0 and float((f[:CHUNK] != 0).float().mean()) < SPARSE_MOMENTS_DENSITY
    for fc, xc in zip(f.split(CHUNK), x.split(CHUNK)):
        fc, xc = fc.to(dev, torch.float64), xc.to(dev, torch.float64)
        sf += fc.sum(0)
        sx += xc.sum(0)
        if sparse:
            _sparse_gram(fc, ff)
        else:
            ff += fc.T @ fc
        fx += fc.T @ xc
    mf, mx = sf / n, sx / n
    return mf, mx, ff - n * torch.outer(mf, mf), fx - n * torch.outer(mf, mx)


def fit_ridge_readout(
    f_train: Tensor,
    x_train: Tensor,
    f_val: Tensor | None = None,
    x_val: Tensor | None = None,
    grid: Sequence[float] = RIDGE_GRID,
    to_raw: Callable[[Tensor], Tensor] | None = None,
) -> Readout:
    """The ridge readout x ~ f R + c in closed form on training rows, its strength chosen on validation rows.

    With F_c, X_c the centred training rows: R = (F_c^T F_c + alpha I)^-1 F_c^T X_c (the K x K normal
    equations), or R = F_c^T (F_c F_c^T + alpha I)^-1 X_c (the N x N dual, the same R) when N < K;
    c = mean(x) - mean(f) R; float64 throughout. alpha = lambda tr(F_c^T F_c) / K for each lambda in ``grid``;
    the lambda with the lowest FVU on the validation rows wins (with ``to_raw``, FVU of to_raw(x) and
    to_raw(x_hat)). Without validation rows the last tenth of the training rows chooses, then all are refit.
    """
    if f_val is None or x_val is None or len(f_val) == 0:
        n_fit = len(f_train) - max(len(f_train) // 10, 1)
        if len(grid) == 1 or n_fit < 2:
            lam = grid[len(grid) // 2]
        else:
            lam = fit_ridge_readout(
                f_train[:n_fit], x_train[:n_fit], f_train[n_fit:], x_train[n_fit:], grid, to_raw
            ).ridge
        return fit_ridge_readout(f_train, x_train, f_train, x_train, (lam,), to_raw)
    n, k = f_train.shape
    if n < k:  # the dual: eigh of the N x N Gram matrix
        dev = f_train.device
        f64, x64 = f_train.to(dev, torch.float64), x_train.to(dev, torch.float64)
        mf, mx = f64.mean(0), x64.mean(0)
        fc = f64 - mf
        s, v = torch.linalg.eigh(fc @ fc.T)
        a, c_mat = fc.T @ v, v.T @ (x64 - mx)  # R = A diag(1/(s + alpha)) C
    else:
        mf, mx, gram, cross = _moments(f_train, x_train)
        s, a = torch.linalg.eigh(gram)
        c_mat = a.T @ cross
    s = s.clamp_min(0)
    scale = max(float(s.sum()) / k, 1e-300)
    best = None
    if len(grid) > 1:
        projected = torch.cat([(fv.to(a) - mf) @ a for fv in f_val.split(CHUNK)])  # val rows in the eigenbasis
        for lam in grid:
            weights = c_mat / (s + lam * scale).unsqueeze(1)
            x_hat = torch.cat([p @ weights + mx for p in projected.split(CHUNK)])
            fvu = readout_scores(x_val, x_hat, to_raw)["fvu"]
            if best is None or fvu < best[0]:
                best = (fvu, lam)
    lam = best[1] if best else grid[0]
    r = a @ (c_mat / (s + lam * scale).unsqueeze(1))
    return Readout(r, mx - mf @ r, float(lam))


def readout_scores(x: Tensor, x_hat: Tensor, to_raw: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """Reconstruction quality over the rows of x (N x D) and x_hat, pooled in float64 (with ``to_raw``,
    both mapped to raw activations first):

    - fvu = sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean(x)||^2 (mean over these rows);
    - explained_variance = 1 - fvu: the pooled ratio (dictionary_learning's ``frac_variance_explained``),
      not SAELens's mean over rows of per-row ratios, which rows of small variance dominate;
    - cosine = (1/N) sum_i <x_i, x_hat_i> / (||x_i|| ||x_hat_i||);
    - l2_ratio = (1/N) sum_i ||x_hat_i|| / ||x_i||.
    """
    n = len(x)
    resid = cos = ratio = 0.0
    sx = sxx = None
    for xc, hc in zip(x.split(CHUNK), x_hat.split(CHUNK)):
        hc = hc.to(xc.device)
        if to_raw is not None:
            xc, hc = to_raw(xc), to_raw(hc)
        xc, hc = xc.double(), hc.double()
        resid += float((xc - hc).pow(2).sum())
        xn, hn = xc.norm(dim=1), hc.norm(dim=1)
        cos += float(((xc * hc).sum(1) / (xn * hn).clamp_min(1e-30)).sum())
        ratio += float((hn / xn.clamp_min(1e-30)).sum())
        sx = xc.sum(0) if sx is None else sx + xc.sum(0)
        sq_chunk = float(xc.pow(2).sum())
        sxx = sq_chunk if sxx is None else sxx + sq_chunk
    if n == 0:
        return {"fvu": math.nan, "explained_variance": math.nan, "cosine": math.nan, "l2_ratio": math.nan}
    sq = sxx - float(sx.pow(2).sum()) / n  # sum ||x_i - mean||^2 = sum ||x_i||^2 - N ||mean||^2
    fvu = resid / sq if sq > 0 else math.nan
    return {"fvu": fvu, "explained_variance": 1.0 - fvu, "cosine": cos / n, "l2_ratio": ratio / n}


# -- k-sparse probing -------------------------------------------------------------------------------------
def group_means(f: Tensor, y: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Per group (document): the mean of its rows' features (G x K) and its most frequent label (G).
    Groups come in the order of their sorted ids."""
    ids, index = torch.unique(groups.to(f.device), return_inverse=True)
    sums = torch.zeros(len(ids), f.shape[1], dtype=torch.float64, device=f.device).index_add_(0, index, f.double())
    counts = torch.bincount(index, minlength=len(ids)).double()
    y = y.to(f.device).long()
    votes = torch.zeros(len(ids), int(y.max()) + 1, dtype=torch.long, device=f.device)
    votes.index_put_((index, y), torch.ones_like(y), accumulate=True)
    return (sums / counts.unsqueeze(1)).float(), votes.argmax(1)


def top_k_by_mean_difference(f: Tensor, positive: Tensor, k: int) -> Tensor:
    """Indices of the k components with the largest |mean(f_j | positive) - mean(f_j | negative)|, largest
    first (ties: the lower index)."""
    f = f.double()
    diff = (f[positive].mean(0) - f[~positive].mean(0)).abs()
    return torch.argsort(diff, descending=True, stable=True)[: min(k, f.shape[1])]


def _logistic_balanced_accuracy(z_train, t_train, z_test, t_test) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(z_train)
    clf = LogisticRegression(class_weight="balanced", max_iter=1000).fit(scaler.transform(z_train), t_train)
    pred = clf.predict(scaler.transform(z_test))
    return 0.5 * (float((pred[t_test]).mean()) + float((~pred[~t_test]).mean()))


def sparse_probe_accuracy(
    f_train: Tensor,
    y_train: Tensor,
    f_test: Tensor,
    y_test: Tensor,
    ks: Sequence[int] = SPARSE_PROBE_KS,
    groups_train: Tensor | None = None,
    groups_test: Tensor | None = None,
) -> dict[str, float]:
    """k-sparse probing (Gurnee et al. 2023), keyed by str(k).

    For each label c (one vs rest): the k components with the largest |difference of class means| on the
    training rows, then logistic regression (standardised, class-balanced weights, scikit-learn) on those
    k columns alone, scored on the test rows by balanced accuracy (mean of the true-positive and
    true-negative rates: accuracy on a balanced test set, as SAEBench balances its tasks; chance = 0.5).
    The value is the mean over labels with positives and negatives in both splits (NaN if none); rows
    labelled -1 (no label) are left out. With groups (document ids), every document is one sample: the mean
    of its rows' features, its majority label.
    """
    from threadpoolctl import threadpool_limits

    nan = {str(k): math.nan for k in ks}
    keep_train, keep_test = y_train >= 0, y_test >= 0  # -1: no label
    if not bool(keep_train.any()) or not bool(keep_test.any()):
        return nan
    f_train, y_train, f_test, y_test = f_train[keep_train], y_train[keep_train], f_test[keep_test], y_test[keep_test]
    groups_train = None if groups_train is None else groups_train[keep_train]
    groups_test = None if groups_test is None else groups_test[keep_test]
    if groups_train is not None:
        f_train, y_train = group_means(f_train, y_train, groups_train)
    if groups_test is not None:
        f_test, y_test = group_means(f_test, y_test, groups_test)
    f_train, f_test = f_train.detach().cpu(), f_test.detach().cpu()
    y_train, y_test = y_train.cpu().long(), y_test.cpu().long()
    labels = [
        c for c in torch.unique(y_train).tolist()
        if 0 < int((y_train == c).sum()) < len(y_train) and 0 < int((y_test == c).sum()) < len(y_test)
    ]  # fmt: skip
    scores: dict[str, list[float]] = {str(k): [] for k in ks}
    with threadpool_limits(limits=1, user_api="blas"):
        for c in labels:
            pos_train, pos_test = (y_train == c), (y_test == c)
            order = top_k_by_mean_difference(f_train, pos_train, max(ks))
            for k in ks:
                idx = order[:k]
                scores[str(k)].append(
                    _logistic_balanced_accuracy(
                        f_train[:, idx].double().numpy(), pos_train.numpy(),
                        f_test[:, idx].double().numpy(), pos_test.numpy(),
                    )
                )  # fmt: skip
    return {k: float(np.mean(v)) if v else math.nan for k, v in scores.items()}


# -- everything the report writes -------------------------------------------------------------------------
def sae_evaluation(
    f_train: Tensor,
    x_train: Tensor,
    f_val: Tensor | None,
    x_val: Tensor | None,
    f_test: Tensor,
    x_test: Tensor,
    y_train: Tensor | None,
    y_test: Tensor | None,
    groups_train: Tensor | None = None,
    groups_test: Tensor | None = None,
    ks: Sequence[int] = SPARSE_PROBE_KS,
    threshold: float = ACTIVE_THRESHOLD,
    to_raw: Callable[[Tensor], Tensor] | None = None,
    grid: Sequence[float] = RIDGE_GRID,
) -> tuple[dict, Readout]:
    """The SAE users' numbers of one model's features, and the fitted readout.

    - ``l0``, ``dead_fraction``: over every given row (train, val and test: the evaluation window);
    - ``fvu``, ``explained_variance``, ``cosine``, ``l2_ratio``: the ridge readout (:func:`fit_ridge_readout`,
      fit on train, strength ``readout_ridge`` chosen on val) scored on test (:func:`readout_scores`; with
      ``to_raw`` on raw activations);
    - ``sparse_probe_accuracy``: {str(k): ...} (:func:`sparse_probe_accuracy`), when labels are given.
    """
    window = [f for f in (f_train, f_val, f_test) if f is not None]
    readout = fit_ridge_readout(f_train, x_train, f_val, x_val, grid, to_raw)
    metrics = {
        "l0": l0(window, threshold),
        "dead_fraction": dead_fraction(window, threshold),
        **readout_scores(x_test, readout(f_test), to_raw),
        "readout_ridge": readout.ridge,
    }
    if y_train is not None and y_test is not None:
        metrics["sparse_probe_accuracy"] = sparse_probe_accuracy(
            f_train, y_train, f_test, y_test, ks, groups_train, groups_test
        )
    return metrics, readout
