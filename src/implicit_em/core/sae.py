"""The SAE baselines' training recipe as the field runs it (Gao et al. 2024; Bussmann et al. 2024), pure functions.

Decoder directions kept at unit norm with the gradient along each removed; the decoder bias started at the data's
mean or geometric median; the learning rate of Gao et al.'s rule with a warm-up and a linear decay; the AuxK loss
of dead components with a dead window counted in rows seen; and the BatchTopK inference threshold that gives a
mean L0 of exactly k on a set of rows. The models (:mod:`implicit_em.models.topk_sae`,
:mod:`implicit_em.models.batchtopk_sae`, :mod:`implicit_em.models.sae`) and the training module call these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

#: Gao et al.'s dead window: a component that has not fired for this many rows (tokens) is dead
DEAD_ROWS_CAP = 10_000_000
#: sparsify's and dictionary_learning's warm-up length, in optimiser steps
WARMUP_STEPS_CAP = 1000


def unit_norm(w: Tensor, dim: int) -> Tensor:
    """w_j <- w_j / ||w_j||: every direction along ``dim`` scaled to unit norm (a zero direction stays 0)."""
    return w / w.norm(dim=dim, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def remove_parallel_gradient(w: Tensor, grad: Tensor, dim: int) -> Tensor:
    """g_j <- g_j - (g_j . w_j) w_j for every unit direction w_j along ``dim``: the part of the gradient that
    would only change ||w_j|| removed, so a step moves w_j on the tangent plane of its unit sphere (first order)."""
    return grad - (grad * w).sum(dim=dim, keepdim=True) * w


@torch.no_grad()
def geometric_median(x: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """m = argmin_m sum_i ||x_i - m|| (x: N x D) by Weiszfeld's iteration from the mean:
    m <- sum_i w_i x_i / sum_i w_i, w_i = 1 / max(||x_i - m||, eps); stops when m moves less than tol (relative)."""
    x = x.double()
    m = x.mean(0)
    eps = 1e-12
    for _ in range(iterations):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        moved = (new - m).norm() / m.norm().clamp_min(eps)
        m = new
        if moved < tol:
            break
    return m


def gao_learning_rate(n_components: int) -> float:
    """lr = 2e-4 / sqrt(K / 2^14): Gao et al.'s learning rate for K components (sparsify's default)."""
    return 2e-4 / math.sqrt(n_components / 2**14)


def warmup_steps_for(total_steps: int) -> int:
    """W = min(1000, T / 20): sparsify's and dictionary_learning's 1,000 warm-up steps, at most 5% of a short run
    of T optimiser steps."""
    return min(WARMUP_STEPS_CAP, max(1, total_steps // 20))


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """f(t) = min(1, (t + 1) / W) * min(1, (T - t) / (F T)): the learning rate of optimiser step t (0-based) is
    lr * f(t), a linear warm-up over the first W steps and a linear decay to 0 over the last fraction F of the T
    steps (W = 0 or F = 0: none of that part). Steps past T keep the last step's factor."""
    factor = 1.0
    if warmup_steps > 0:
        factor *= min(1.0, (step + 1) / warmup_steps)
    if decay_fraction > 0 and total_steps > 0:
        factor *= min(1.0, max(1, total_steps - step) / (decay_fraction * total_steps))
    return factor


def dead_window_rows(total_rows: int) -> int:
    """min(10M, R / 10) for a run that sees R rows in all: Gao et al.'s 10M tokens, scaled down for short runs so
    that a component can be found dead, and revived, ten times over a run."""
    return max(1, min(DEAD_ROWS_CAP, total_rows // 10))


def auxk_loss(error: Tensor, z: Tensor, dead: Tensor, decoder_weight: Tensor, k_aux: int) -> Tensor:
    """L_aux = ||e - e_hat||^2 / ||e - mean(e)||^2, e_hat = W_d TopK_aux(ReLU(z) on dead components only).

    ``error`` e = x - x_hat (N x D, a target: no gradient), ``z`` the pre-activations (N x K), ``dead`` a K mask,
    ``decoder_weight`` W_d (D x K). Normalised by the error's own variance so its scale does not depend on how well
    the SAE already does. 0 when no component is dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return z.new_zeros(())
    masked = torch.where(dead, z, torch.full_like(z, -torch.inf))
    values, idx = masked.topk(min(k_aux, n_dead), dim=-1)
    codes = torch.zeros_like(z).scatter(-1, idx, F.relu(values))
    e_hat = codes @ decoder_weight.T
    target = error.detach()
    denominator = (target - target.mean(0)).pow(2).sum().clamp_min(torch.finfo(target.dtype).tiny)
    return (target - e_hat).pow(2).sum() / denominator


@torch.no_grad()
def mean_l0_threshold(chunks: Callable[[], Iterable[Tensor]], k: int) -> Tensor:
    """theta such that sum_i #{j : a_ij > theta} = N k over all rows: the mean L0 of a = z * 1[z > theta] is
    exactly k (barring ties); theta is the (N k + 1)-th largest code, 0 when fewer codes are positive.

    ``chunks()`` yields the codes a (n_c x K, >= 0) chunk by chunk and is called twice. Exact in two passes with
    bounded memory: each chunk's own (n_c k + 1)-th largest code t_c brackets theta in [min t_c, max t_c] (the
    counts add up over chunks); the second pass counts the codes above the bracket and keeps those inside it.
    """
    bounds, n_rows, n_values = [], 0, 0
    for a in chunks():
        n_rows, n_values = n_rows + a.shape[0], n_values + a.numel()
        m = a.shape[0] * k + 1
        bounds.append(a.flatten().topk(m).values[-1] if m <= a.numel() else a.new_zeros(()))
    rank = n_rows * k + 1  # theta is the rank-th largest
    if not bounds or rank > n_values:
        return torch.zeros(())
    lo, hi = torch.stack(bounds).min(), torch.stack(bounds).max()
    above, band = 0, []
    for a in chunks():
        above += int((a > hi).sum())
        band.append(a[(a >= lo) & (a <= hi) & (a > 0)])  # the zeros need no keeping: theta >= 0
    inside, need = torch.cat(band), rank - above
    if need > len(inside):  # fewer than N k + 1 positive codes: every positive one is kept
        return torch.zeros(())
    return inside.topk(need).values[-1].float().cpu()
