"""Bootstrap intervals over units: resample counts, the percentile interval of a ratio of totals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from implicit_em.eval.bootstrap import bootstrap_interval, resample_counts


def test_each_resample_draws_every_unit_count_times_with_replacement():
    c = resample_counts(7, n_resamples=500, seed=3)
    assert c.shape == (500, 7) and (c.sum(1) == 7).all() and (c >= 0).all()
    assert torch.equal(c, resample_counts(7, n_resamples=500, seed=3)) and not torch.equal(
        c, resample_counts(7, 500, 4)
    )
    assert c.mean().item() == pytest.approx(1.0) and 0.7 < c.var(0).mean().item() < 1.1  # Binomial(7, 1/7): 6/7


def test_the_interval_is_the_percentiles_of_the_statistic_over_resamples():
    """Against a direct loop: draw the units, total them, take the ratio, then the 2.5 and 97.5 percentiles."""
    g = torch.Generator().manual_seed(0)
    n = torch.randint(5, 50, (30,), generator=g).double()
    loss = n * (2 + torch.rand(30, generator=g, dtype=torch.float64))
    sums = torch.stack([n, loss], 1)
    lo, hi = bootstrap_interval(sums, lambda t: t[:, 1] / t[:, 0], n_resamples=400, seed=1)
    counts = resample_counts(30, 400, seed=1).numpy()
    values = []
    for row in counts:
        picked = np.repeat(np.arange(30), row.astype(int))
        values.append(loss.numpy()[picked].sum() / n.numpy()[picked].sum())
    assert (lo, hi) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), rel=1e-12)
    full = float(loss.sum() / n.sum())
    assert lo < full < hi


def test_identical_units_give_a_point_and_more_units_a_narrower_interval():
    same = torch.tensor([[10.0, 25.0]]).repeat(20, 1)
    assert bootstrap_interval(same, lambda t: t[:, 1] / t[:, 0]) == pytest.approx((2.5, 2.5))
    g = torch.Generator().manual_seed(0)

    def width(w: int) -> float:
        x = torch.randn(w, generator=g, dtype=torch.float64)
        lo, hi = bootstrap_interval(
            torch.stack([torch.ones(w, dtype=torch.float64), x], 1), lambda t: t[:, 1] / t[:, 0]
        )
        return hi - lo

    narrow, wide = width(1600), width(100)
    assert narrow < wide / 2.5 and wide == pytest.approx(2 * 1.96 / 10, rel=0.25)  # about 2 x 1.96 sigma / sqrt(W)


def test_non_finite_resamples_are_left_out_and_bad_input_refused():
    sums = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    lo, hi = bootstrap_interval(sums, lambda t: t[:, 1] / (t[:, 0] - t[:, 0]))
    assert math.isnan(lo) and math.isnan(hi)  # every resample's statistic is infinite
    with pytest.raises(ValueError, match="W x m"):
        bootstrap_interval(torch.zeros(0, 2), lambda t: t[:, 0])
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(sums, lambda t: t[:, 0], level=1.5)
