"""Bootstrap intervals over units (e.g. the windows of a spliced evaluation) for statistics of summed quantities.

Each unit w = 1..W contributes a row of sums s_w (e.g. its predicted tokens, its summed CE and KL). A statistic is
a function of the totals S = sum_w s_w (e.g. CE = S_ce / S_tokens, a ratio of totals, not a mean of per-unit
ratios). One resample draws W units uniformly with replacement: unit w is taken c_w times, (c_1..c_W) ~
Multinomial(W; 1/W, ..., 1/W), and gives the totals S* = sum_w c_w s_w. The percentile interval at level
1 - alpha is the alpha/2 and 1 - alpha/2 quantiles (linear interpolation) of the statistic over B resamples
(Efron and Tibshirani 1993, ch. 13); resamples whose statistic is not finite are left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: resamples of a bootstrap interval
N_RESAMPLES = 1000


def resample_counts(n_units: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Tensor:
    """B x W counts c: row b holds how often each unit is drawn in resample b (each row sums to W)."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n_units, (n_resamples, n_units), generator=g)
    counts = torch.zeros(n_resamples, n_units, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones_like(counts))


def bootstrap_interval(
    sums: Tensor,
    statistic: Callable[[Tensor], Tensor],
    level: float = 0.95,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``statistic`` over units (see the module docstring).

    Args:
        sums: W x m per-unit sums s_w (W >= 1 units, m quantities).
        statistic: totals (B x m) -> B values, applied row by row (vectorised over resamples).
        level: 1 - alpha.
        n_resamples: B.
        seed: fixes the resamples.

    Returns:
        (lo, hi); both NaN when no resample gives a finite statistic.
    """
    if sums.ndim != 2 or len(sums) == 0:
        raise ValueError(f"sums must be W x m with W >= 1 (got shape {tuple(sums.shape)})")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1) (got {level})")
    totals = resample_counts(len(sums), n_resamples, seed) @ sums.double()
    values = statistic(totals).double()
    values = values[torch.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    alpha = 1 - level
    lo, hi = torch.quantile(values, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64))
    return float(lo), float(hi)
