"""The streaming pass keeps exactly what a pass over all rows at once would find."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from implicit_em.lm.dashboard.stream import ComponentStream, StreamConfig


def _data(n_rows: int = 3000, k: int = 12, seed: int = 0):
    """ReLU codes of varied scales (component j ~ 2^(j - 6)) over contexts of 1 to 40 rows."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.relu(torch.randn(n_rows, k, generator=g)) * (2.0 ** (torch.arange(k) - 6.0))
    lengths = torch.randint(1, 41, (n_rows,), generator=g)
    ctx = torch.repeat_interleave(torch.arange(n_rows), lengths)[:n_rows]
    return codes, ctx


def _feed(codes, ctx, config, batch: int = 257, seed: int = 0) -> ComponentStream:
    """Feed batches of about ``batch`` rows cut at context ends, as the sources do."""
    stream = ComponentStream(codes.shape[1], config, seed)
    n, at = len(codes), 0
    while at < n:
        end = min(n, at + batch)
        while end < n and ctx[end] == ctx[end - 1]:
            end += 1
        new = torch.ones(end - at, dtype=torch.bool)
        new[1:] = ctx[at + 1 : end] != ctx[at : end - 1]
        stream.update(codes[at:end], torch.arange(at, end) + 1000, new)
        at = end
    return stream


def test_top_contexts_are_the_largest_context_maxima_with_their_values():
    codes, ctx = _data()
    cfg = StreamConfig(top=7, samples=10, context=16)
    stats = _feed(codes, ctx, cfg).finish()
    n_ctx = int(ctx.max()) + 1
    ctx_max = torch.full((n_ctx, codes.shape[1]), -1.0).scatter_reduce(
        0, ctx.unsqueeze(1).expand_as(codes), codes, "amax"
    )
    for j in range(codes.shape[1]):
        want = torch.sort(ctx_max[:, j], descending=True).values[:7]
        got = [it["value"] for it in stats.top[j]]
        assert got == pytest.approx(want.tolist(), rel=1e-6)
        for it in stats.top[j]:
            first = it["start"] - 1000
            rows = torch.arange(first, first + it["length"])
            assert len(set(ctx[rows].tolist())) == 1  # one context
            assert it["length"] <= 16
            assert it["values"][it["pos"]] == pytest.approx(it["value"], rel=1e-3)  # the snippet holds the max
            np.testing.assert_allclose(it["values"], codes[rows, j].numpy(), rtol=2e-3, atol=1e-6)  # float16
        assert stats.maximum[j] == pytest.approx(float(codes[:, j].max()))


def test_density_mean_and_histogram_match_one_pass_over_everything():
    codes, ctx = _data(seed=1)
    cfg = StreamConfig(bins=16)
    stats = _feed(codes, ctx, cfg).finish()
    active = codes.abs() > cfg.threshold
    np.testing.assert_array_equal(stats.active, active.sum(0).numpy())
    np.testing.assert_allclose(stats.mean, codes.double().mean(0).numpy(), rtol=1e-6)  # float32 batch sums
    assert stats.rows == len(codes)
    for j in range(codes.shape[1]):
        v = codes[active[:, j], j].double().numpy()
        top = stats.hist_top[j]
        assert top >= v.max() > top / 2  # the smallest power of two above the maximum
        want = np.bincount(np.minimum(np.floor(v / top * 16).astype(int), 15), minlength=16)
        np.testing.assert_array_equal(stats.hist_counts[j], want)


def test_samples_are_active_rows_spread_over_the_whole_pass():
    n, k = 20_000, 300
    codes = torch.ones(n, k)  # every row active: the sample's rows should be uniform over [0, n)
    cfg = StreamConfig(samples=20, quantiles=4)
    stream = ComponentStream(k, cfg, seed=3)
    for lo in range(0, n, 1000):
        stream.update(codes[lo : lo + 1000], torch.arange(lo, lo + 1000), torch.ones(1000, dtype=torch.bool))
    stats = stream.finish()
    rows = np.array([it["start"] for groups in stats.quantiles for g in groups for it in g["items"]])
    assert len(rows) == 20 * k
    assert len(stats.quantiles[0]) == 4
    # a uniform sample of [0, n): mean n/2 (sd of the mean ~ n / sqrt(12 * 6000) ~ 75), both halves hit
    assert abs(rows.mean() - n / 2) < 400
    assert (rows < n / 2).mean() == pytest.approx(0.5, abs=0.03)


def test_quantile_groups_are_ordered_and_hold_real_values():
    codes, ctx = _data(seed=2)
    stats = _feed(codes, ctx, StreamConfig(samples=25, quantiles=5, context=8)).finish()
    for j in range(codes.shape[1]):
        groups = stats.quantiles[j]
        assert len(groups) == 5
        his = [g["hi"] for g in groups]
        assert his == sorted(his, reverse=True)  # highest quantile first
        for g in groups:
            for it in g["items"]:
                assert g["lo"] <= it["value"] <= g["hi"]
                row = it["start"] - 1000 + it["pos"]
                assert it["value"] == pytest.approx(float(codes[row, j]), rel=1e-6)
                assert it["value"] > 0.01


def test_a_component_that_never_fires_keeps_nothing():
    codes = torch.zeros(100, 3)
    codes[:, 1] = 1.0
    stream = ComponentStream(3, StreamConfig(top=5, samples=5))
    stream.update(codes, torch.arange(100), torch.ones(100, dtype=torch.bool))
    stats = stream.finish()
    assert stats.top[0] == [] and stats.quantiles[0] == [] and stats.hist_top[0] == 0
    assert len(stats.top[1]) == 5 and stats.density[1] == 1.0


def test_settings_are_checked():
    with pytest.raises(ValueError, match="power of two"):
        StreamConfig(bins=12)
    with pytest.raises(ValueError, match="top"):
        StreamConfig(top=0)


def test_the_first_rows_of_each_context_are_shown_but_never_chosen_or_counted():
    codes, ctx = _data(seed=3)
    first = torch.ones(len(ctx), dtype=torch.bool)
    first[1:] = ctx[1:] != ctx[:-1]
    codes[first] += 1000.0  # an attention sink: the first row of every context is an outlier
    stats = _feed(codes, ctx, StreamConfig(top=5, samples=8, context=16, skip_first=1)).finish()
    rest = codes[~first]
    assert stats.rows == len(rest)
    np.testing.assert_array_equal(stats.active, (rest.abs() > 0.01).sum(0).numpy())
    np.testing.assert_allclose(stats.maximum, rest.amax(0).numpy(), rtol=1e-6)
    for j in range(codes.shape[1]):
        for it in stats.top[j] + [x for g in stats.quantiles[j] for x in g["items"]]:
            row = it["start"] - 1000 + it["pos"]
            assert not first[row] and it["value"] < 1000  # chosen among the other rows
        top = stats.top[j][0]
        if top["start"] - 1000 == int(torch.nonzero(ctx == ctx[top["start"] - 1000])[0]):  # snippet from the start
            assert top["values"][0] > 999  # the first row is still shown, with its value
