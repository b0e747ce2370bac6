"""Diagnostics: hand-computed values and batch accumulation (the same values synced under 2-process CPU DDP:
tests/core/test_distributed.py, which shares its fork server)."""

import math

import pytest
import torch

from implicit_em.core.objective import (
    correlation_matrix,
    decorrelation_loss,
    off_diagonal_sq_norm,
    subset_estimate_variance,
)
from implicit_em.eval.diagnostics import (
    REDUNDANCY_EXACT_MAX,
    REDUNDANCY_SUBSET,
    ComponentUsage,
    DeadComponents,
    L0Density,
    Redundancy,
    ResponsibilityEntropy,
    component_diagnostics,
    effective_rank,
    weight_redundancy,
)

# entropy of (3/4, 1/4): -(3/4 log 3/4 + 1/4 log 1/4) = 0.562335
H_QUARTER = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))


def _value(metric, *batches):
    for b in batches:
        metric.update(b)
    return metric.compute()


def test_responsibility_entropy_by_hand():
    # row 1: r = (1/2, 1/2), entropy log 2; row 2: r = (1, 1/3) / (4/3) = (3/4, 1/4)
    d = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]])
    value = _value(ResponsibilityEntropy(), d)
    assert value.item() == pytest.approx((math.log(2) + H_QUARTER) / 2, abs=1e-7)
    assert value.item() == pytest.approx(0.627741, abs=1e-6)
    # equal distances: log K, no specialisation; one component much closer: 0
    assert _value(ResponsibilityEntropy(), torch.ones(5, 4)).item() == pytest.approx(math.log(4), abs=1e-9)
    hard = torch.tensor([[0.0, 1e4, 1e4], [1e4, 0.0, 1e4]])
    assert _value(ResponsibilityEntropy(), hard).item() == pytest.approx(0.0, abs=1e-12)


def test_l0_density_by_hand():
    d = torch.tensor([[0.0, 0.005, 0.5], [1.0, 0.02, 0.0]])  # above 0.01: 0.5, 1.0, 0.02
    assert _value(L0Density(), d).item() == pytest.approx(3 / 6)
    assert _value(L0Density(threshold=0.6), d).item() == pytest.approx(1 / 6)


def test_component_usage_by_hand():
    d = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]])  # r rows (1/2, 1/2), (3/4, 1/4)
    usage = _value(ComponentUsage(n_components=2), d)
    assert torch.allclose(usage.double(), torch.tensor([0.625, 0.375], dtype=torch.float64))


# columns: 0 always zero (dead, never active); 1 constant 0.05 (dead, active); 2 (0, 1, 0, 1) var 1/3;
# 3 (0, .2, 0, .2) var 4 (.1)^2 / 3 = 0.0133 (alive); 4 (0, .1, 0, .1) var 4 (.05)^2 / 3 = 0.0033 (dead)
DEAD = torch.tensor(
    [
        [0.0, 0.05, 0.0, 0.0, 0.0],
        [0.0, 0.05, 1.0, 0.2, 0.1],
        [0.0, 0.05, 0.0, 0.0, 0.0],
        [0.0, 0.05, 1.0, 0.2, 0.1],
    ]
)


def test_dead_components_by_hand():
    metric = DeadComponents(n_components=5)
    out = _value(metric, DEAD)
    assert int(out["dead_components"]) == 3
    assert int(out["never_active"]) == 1
    var = metric.variance().reshape(-1)
    expected = torch.tensor([0.0, 0.0, 1 / 3, 0.04 / 3, 0.01 / 3], dtype=torch.float64)
    assert torch.allclose(var, expected, atol=1e-12)
    assert int(_value(DeadComponents(n_components=5, threshold=0.001), DEAD)["dead_components"]) == 2


def test_redundancy_by_hand():
    # the objective's 3 x 2 example: Corr_12 = -1/2 / sqrt(7/3), ||Corr - I||^2 off-diagonal = 2 * 3/28 = 3/14
    d = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 3.0]])
    out = _value(Redundancy(n_components=2), d)
    assert out["redundancy"].item() == pytest.approx(3 / 14, abs=1e-7)
    assert out["redundancy_stderr"].item() == 0.0  # exact
    # three perfectly (anti-)correlated copies: K (K - 1) = 6
    col = torch.tensor([[0.0], [1.0], [3.0], [2.0]])
    copies = torch.cat([col, 2 * col + 1, -col], dim=1)
    assert _value(Redundancy(n_components=3), copies)["redundancy"].item() == pytest.approx(6.0, abs=1e-6)
    # a constant component is uncorrelated with everything (no NaN)
    with_dead = torch.cat([copies[:, :2], torch.zeros(4, 1)], dim=1)
    assert _value(Redundancy(n_components=3), with_dead)["redundancy"].item() == pytest.approx(2.0, abs=1e-6)


def test_weight_redundancy_and_effective_rank_by_hand():
    # unit rows (.6, .8), (1, 0), (0, 1): off-diagonal Gram .6, .8, 0, each twice -> 2 (.36 + .64) = 2
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # K = 3 > D = 2: the D x D path
    assert weight_redundancy(w).item() == pytest.approx(2.0, abs=1e-12)
    assert weight_redundancy(torch.cat([w, torch.zeros(3, 2)], 1)).item() == pytest.approx(2.0, abs=1e-12)  # K x K
    assert weight_redundancy(torch.eye(4) * 3).item() == pytest.approx(0.0, abs=1e-12)
    assert weight_redundancy(torch.ones(3, 3)).item() == pytest.approx(6.0, abs=1e-9)
    # singular values 3 and 1 -> p = (3/4, 1/4) -> exp(H) = exp(0.562335) = 1.754765
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))).item() == pytest.approx(math.exp(H_QUARTER), abs=1e-9)
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))).item() == pytest.approx(1.754765, abs=1e-6)
    assert effective_rank(torch.eye(5) * 2).item() == pytest.approx(5.0, abs=1e-9)
    rank_one = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -1.0]))
    assert effective_rank(rank_one).item() == pytest.approx(1.0, abs=1e-6)


def test_weight_metrics_at_large_k_use_the_d_by_d_side(monkeypatch):
    # W above CHUNK_ELEMENTS (lowered here to 2^16, so that K = 1500 x D = 300, 450k entries, is above it: the
    # paths of a 5000 x 1000 W under the real limit): the D x D Gram, accumulated over 7 chunks of rows, and
    # its eigenvalues agree with the direct K x K formula and LAPACK's singular values
    import implicit_em.eval.diagnostics as metrics

    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 1 << 16)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1500, 300, generator=g)
    w[:, :10] *= 20  # a few dominant directions
    w[7] = 0.0  # a zero row
    wn = w.double() / w.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    direct = off_diagonal_sq_norm(wn @ wn.T)
    assert weight_redundancy(w).item() == pytest.approx(direct.item(), rel=1e-10)
    s = torch.linalg.svdvals(w.double())
    p = s / s.sum()
    assert effective_rank(w).item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-9)


def _random_distances(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.relu(torch.randn(n, k, generator=g) + 0.3) * torch.rand(1, k, generator=g) * 3
    d[:, 0] = 0.0  # a dead component
    d[:, 1] = 0.004 * torch.rand(n, generator=g)  # dead, never active
    return d


def _metrics(k):
    return {
        "entropy": ResponsibilityEntropy(),
        "l0": L0Density(),
        "usage": ComponentUsage(k),
        "dead": DeadComponents(k),
        "redundancy": Redundancy(k),
    }


def _results(metrics):
    out = {}
    for name, m in metrics.items():
        value = m.compute()
        for key, v in value.items() if isinstance(value, dict) else [(name, value)]:
            out[key] = v.double()
    return out


def _assert_same(a, b, atol=1e-10):
    assert set(a) == set(b)
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=atol), (key, a[key], b[key])


def test_accumulating_over_batches_equals_whole_tensor(monkeypatch):
    import implicit_em.eval.diagnostics as metrics

    d = _random_distances(103, 6, seed=0)
    whole, batched = _metrics(6), _metrics(6)
    for m in whole.values():
        m.update(d)
    for chunk in d.split([40, 2, 33, 28]):
        for m in batched.values():
            m.update(chunk)
    a, b = _results(whole), _results(batched)
    _assert_same(a, b)
    # the updates' own row chunking (here 2 rows at a time) changes nothing either
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 12)
    small = _metrics(6)
    for m in small.values():
        m.update(d)
    _assert_same(a, _results(small))
    # and against direct computations on the whole tensor
    r = torch.softmax(-d.double(), -1)
    assert torch.allclose(a["entropy"], -(r * r.log().nan_to_num()).sum(-1).mean())
    assert torch.allclose(a["usage"], r.mean(0))
    assert torch.allclose(a["l0"], (d > 0.01).double().mean())
    var = d.double().var(0)
    assert a["dead_components"].item() == (var < 0.01).sum().item()
    assert a["dead_components"] >= 2 and a["never_active"] >= 1
    assert torch.allclose(a["redundancy"], decorrelation_loss(d.double()), atol=1e-6)


def _grouped_distances(n, k, seed):
    """Components in groups of 4 that share a signal: a few strongly correlated pairs among many weak
    ones, so that a subset estimate has a variance worth testing."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, k // 4, generator=g).repeat_interleave(4, dim=1)
    return torch.relu(shared + 0.7 * torch.randn(n, k, generator=g) + 0.2)


def test_redundancy_estimate_is_unbiased_and_its_standard_error_is_right():
    k, subset, seeds = 60, 12, 400
    d = _grouped_distances(300, k, seed=0)
    exact = decorrelation_loss(d.double()).item()
    assert _value(Redundancy(k), d)["redundancy"].item() == pytest.approx(exact, rel=1e-9)
    outs = [_value(Redundancy(k, max_exact=20, subset=subset, seed=s), d) for s in range(seeds)]
    values = torch.tensor([o["redundancy"].item() for o in outs], dtype=torch.float64)
    stderrs = torch.tensor([o["redundancy_stderr"].item() for o in outs], dtype=torch.float64)
    sd = subset_estimate_variance(correlation_matrix(d.double()).pow(2), subset).sqrt().item()
    assert sd > 0.1 * exact  # the estimate is genuinely noisy here
    assert abs(values.mean().item() - exact) <= 4 * sd / math.sqrt(seeds)  # unbiased
    assert values.std().item() == pytest.approx(sd, rel=0.15)  # the spread over subsets is the formula's
    # the reported standard error estimates that spread from one subset: right on average
    assert stderrs.pow(2).mean().item() == pytest.approx(sd**2, rel=0.2)


def test_redundancy_above_the_exact_limit_holds_no_k_by_k_state():
    k = 5000  # a K x K float64 state would be 200 MB
    metric = Redundancy(k)
    assert metric.cross.shape == (REDUNDANCY_SUBSET, REDUNDANCY_SUBSET) and k > REDUNDANCY_EXACT_MAX
    d = _grouped_distances(64, k, seed=1)
    for chunk in d.split(20):
        metric.update(chunk)
    out = metric.compute()
    exact = decorrelation_loss(d.double()).item()  # the N x N route: affordable at this K
    assert abs(out["redundancy"].item() - exact) <= 5 * out["redundancy_stderr"].item()
    assert 0 < out["redundancy_stderr"].item() < 0.2 * exact
    # the same subset on every instance (so on every rank and every epoch)
    assert torch.equal(Redundancy(k).index, metric.index)


def test_component_diagnostics_equal_the_metrics():
    d = _random_distances(50, 5, seed=1)
    w = torch.randn(5, 8)
    out = component_diagnostics(d, w)
    ms = _metrics(5)
    for m in ms.values():
        m.update(d)
    single = _results(ms)
    for key in ("responsibility_entropy", "l0_density", "redundancy", "redundancy_stderr", "dead_components"):
        assert out[key].shape == (), key
    assert torch.allclose(out["responsibility_entropy"].double(), single["entropy"])
    assert torch.allclose(out["redundancy"].double(), single["redundancy"])
    assert out["dead_components"].item() == single["dead_components"].item()
    assert out["usage"].shape == (5,)
    assert torch.allclose(out["weight_redundancy"], weight_redundancy(w))
    assert torch.allclose(out["effective_rank"], effective_rank(w))


def test_component_diagnostics_at_k_16384_in_bounded_memory():
    # what the end-of-run evaluation does at K = 16,384: 2,000 rows, one call; the states are K-vectors
    # and a 1024 x 1024 subset, the updates work on 32 MB chunks
    import resource

    g = torch.Generator().manual_seed(2)
    d = torch.relu(torch.randn(2000, 16384, generator=g))
    w = torch.randn(16384, 64, generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = component_diagnostics(d, w)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 300, grown_mb  # a K x K float64 matrix alone would be 2,147 MB
    assert out["usage"].shape == (16384,) and out["redundancy_stderr"] > 0
    assert out["redundancy"].item() == pytest.approx(16384 * 16383 / 1999, rel=0.1)  # independent: noise floor


def test_reset_clears_state():
    m = Redundancy(2)
    m.update(torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 3.0]]))
    m.reset()
    m.update(torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]))
    assert m.compute()["redundancy"].item() == pytest.approx(2.0, abs=1e-6)  # perfectly correlated pair
