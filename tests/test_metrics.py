"""Diagnostics: hand-computed values, batch accumulation, and the same values under 2-process CPU DDP."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from implicit_em.metrics import (
    ComponentDiagnostics,
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
    assert _value(Redundancy(n_components=2), d).item() == pytest.approx(3 / 14, abs=1e-7)
    # three perfectly (anti-)correlated copies: K (K - 1) = 6
    col = torch.tensor([[0.0], [1.0], [3.0], [2.0]])
    copies = torch.cat([col, 2 * col + 1, -col], dim=1)
    assert _value(Redundancy(n_components=3), copies).item() == pytest.approx(6.0, abs=1e-6)
    # a constant component is uncorrelated with everything (no NaN)
    with_dead = torch.cat([copies[:, :2], torch.zeros(4, 1)], dim=1)
    assert _value(Redundancy(n_components=3), with_dead).item() == pytest.approx(2.0, abs=1e-6)


def test_weight_redundancy_and_effective_rank_by_hand():
    # unit rows (.6, .8), (1, 0), (0, 1): off-diagonal Gram .6, .8, 0, each twice -> 2 (.36 + .64) = 2
    w = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]])
    assert weight_redundancy(w).item() == pytest.approx(2.0, abs=1e-12)
    assert weight_redundancy(torch.eye(4)[None] * 3).item() == pytest.approx(0.0, abs=1e-12)
    # singular values 3 and 1 -> p = (3/4, 1/4) -> exp(H) = exp(0.562335) = 1.754765
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))[None]).item() == pytest.approx(
        math.exp(H_QUARTER), abs=1e-9
    )
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))[None]).item() == pytest.approx(1.754765, abs=1e-6)
    assert effective_rank(torch.eye(5)[None] * 2).item() == pytest.approx(5.0, abs=1e-9)
    rank_one = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -1.0]))[None]
    assert effective_rank(rank_one).item() == pytest.approx(1.0, abs=1e-6)
    # one value per member
    both = torch.stack([torch.eye(3), torch.ones(3, 3)])
    assert torch.allclose(effective_rank(both), torch.tensor([3.0, 1.0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(weight_redundancy(both), torch.tensor([0.0, 6.0], dtype=torch.float64), atol=1e-9)


def _random_distances(s, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.relu(torch.randn(s, n, k, generator=g) + 0.3) * torch.rand(s, 1, k, generator=g) * 3
    d[:, :, 0] = 0.0  # a dead component
    d[:, :, 1] = 0.004 * torch.rand(s, n, generator=g)  # dead, never active
    return d


def _metrics(s, k):
    return {
        "entropy": ResponsibilityEntropy(s),
        "l0": L0Density(s),
        "usage": ComponentUsage(s, k),
        "dead": DeadComponents(s, k),
        "redundancy": Redundancy(s, k),
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


@pytest.mark.parametrize("s", [1, 3])
def test_accumulating_over_batches_equals_whole_tensor(s):
    d = _random_distances(s, 103, 6, seed=0)
    whole, batched = _metrics(s, 6), _metrics(s, 6)
    for m in whole.values():
        m.update(d if s > 1 else d[0])
    for chunk in d.split([40, 2, 33, 28], dim=1):
        for m in batched.values():
            m.update(chunk if s > 1 else chunk[0])
    a, b = _results(whole), _results(batched)
    _assert_same(a, b)
    # and against direct computations on the whole tensor
    r = torch.softmax(-d.double(), -1)
    assert torch.allclose(a["entropy"].reshape(s), -(r * r.log().nan_to_num()).sum(-1).mean(-1))
    assert torch.allclose(a["usage"].reshape(s, 6), r.mean(1))
    assert torch.allclose(a["l0"].reshape(s), (d > 0.01).double().mean((1, 2)))
    var = d.double().var(1)
    assert torch.equal(a["dead_components"].reshape(s), (var < 0.01).sum(-1).double())
    assert (a["dead_components"] >= 2).all() and (a["never_active"] >= 1).all()
    from implicit_em.objective import decorrelation_loss

    assert torch.allclose(a["redundancy"].reshape(s), decorrelation_loss(d.double()), atol=1e-6)


def test_component_diagnostics_equal_the_metrics():
    d = _random_distances(2, 50, 5, seed=1)
    w = torch.randn(2, 5, 8)
    out = component_diagnostics(d, w)
    ms = _metrics(2, 5)
    for m in ms.values():
        m.update(d)
    single = _results(ms)
    for key in ("responsibility_entropy", "l0_density", "redundancy", "dead_components", "never_active"):
        assert out[key].shape == (2,), key
    assert torch.allclose(out["responsibility_entropy"].double(), single["entropy"])
    assert torch.allclose(out["redundancy"].double(), single["redundancy"])
    assert torch.equal(out["dead_components"].double(), single["dead_components"])
    assert out["usage"].shape == (2, 5)
    assert torch.allclose(out["weight_redundancy"], weight_redundancy(w))
    assert torch.allclose(out["effective_rank"], effective_rank(w))


def test_reset_clears_state():
    m = Redundancy(1, 2)
    m.update(torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 3.0]]))
    m.reset()
    m.update(torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]))
    assert m.compute().item() == pytest.approx(2.0, abs=1e-6)  # perfectly correlated pair


# -- 2-process CPU DDP -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, shards: list, s: int, k: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = _metrics(s, k)
        diagnostics = ComponentDiagnostics(s, k)
        for chunk in shards[rank].split(17, dim=1):  # several updates per rank
            for m in metrics.values():
                m.update(chunk)
            diagnostics.update(chunk)
        results = _results(metrics)
        results.update({f"diag/{key}": v for key, v in diagnostics.compute().items()})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears down while another still communicates
    finally:
        dist.destroy_process_group()


def test_metrics_under_ddp_equal_single_process_on_concatenated_data(tmp_path):
    s, k = 2, 6
    d = _random_distances(s, 91, k, seed=2)
    shards = [d[:, :50], d[:, 50:]]  # uneven shards
    mp.spawn(_ddp_worker, args=(2, _free_port(), shards, s, k, str(tmp_path)), nprocs=2, join=True)
    single = _metrics(s, k)
    for m in single.values():
        m.update(d)
    expected = _results(single)
    diag = ComponentDiagnostics(s, k, sync_on_compute=False)
    diag.update(d)
    expected.update({f"diag/{key}": v for key, v in diag.compute().items()})
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        _assert_same(got, expected)
    # the shards alone differ from the whole: the test would notice a missing sync
    alone = _metrics(s, k)
    for m in alone.values():
        m.update(shards[0])
    assert not torch.allclose(_results(alone)["redundancy"], expected["redundancy"])
