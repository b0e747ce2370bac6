"""The objective under 2-process CPU DDP (gloo), float64: every rank holds half of the rows, gathers the
distances with gradients (``gather_samples``) and evaluates the objective on the global batch; the value
and the averaged parameter gradients equal the single-process ones on the whole batch, on both sides of the
N < K and D < K switches, and for the subset estimate drawn from identically seeded generators."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from implicit_em.core.distributed import gather_samples
from implicit_em.core.objective import implicit_em_objective

WORLD = 2
# (global N, K, D, tc_components): N < K and N > K for the decorrelation term, D < K and D > K for the
# weight term, and the subset estimate
CASES = [(24, 40, 10, None), (40, 12, 30, None), (24, 40, 50, None), (40, 12, 8, None), (24, 40, 10, 9)]
LAMBDAS = {"lambda_lse": 0.8, "lambda_var": 0.7, "lambda_tc": 1.3, "lambda_wr": 0.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(n: int, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + dim)
    x = torch.rand(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(k, dim, generator=g, dtype=torch.float64) / dim**0.5
    b = torch.randn(k, generator=g, dtype=torch.float64) * 0.1
    return x, w, b


def _loss_and_grads(x, w, b, m, gather=lambda t: t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    d = gather(torch.relu(x @ w.T + b))
    generator = torch.Generator().manual_seed(11) if m is not None else None  # the same on every rank
    loss = implicit_em_objective(d, w, **LAMBDAS, tc_components=m, generator=generator)["loss"]
    loss.backward()
    return loss.detach(), w.grad, b.grad


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = []
        for n, k, dim, m in CASES:
            x, w, b = _problem(n, k, dim)
            loss, gw, gb = _loss_and_grads(x.chunk(WORLD)[rank], w, b, m, gather_samples)
            for grad in (gw, gb):  # what DDP does to parameter gradients: average them over the ranks
                dist.all_reduce(grad)
                grad /= WORLD
            results.append((loss, gw, gb))
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears down while another still communicates
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_objective")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"N{n}-K{k}-D{d}-m{m}" for n, k, d, m in CASES])
def test_ddp_value_and_gradient_equal_the_single_process_ones(ddp_results, case):
    n, k, dim, m = CASES[case]
    x, w, b = _problem(n, k, dim)
    loss, gw, gb = _loss_and_grads(x, w, b, m)
    for rank in range(WORLD):
        ddp_loss, ddp_gw, ddp_gb = ddp_results[rank][case]
        assert float((ddp_loss - loss).abs() / loss.abs()) <= 1e-12, rank
        for got, want in ((ddp_gw, gw), (ddp_gb, gb)):
            assert float((got - want).abs().max() / want.abs().max()) <= 1e-10, rank
    # the per-shard objective (what DDP without the gather would optimise) is measurably different
    shard_loss, shard_gw, _ = _loss_and_grads(x.chunk(WORLD)[0], w, b, m)
    assert float((shard_gw - gw).abs().max() / gw.abs().max()) > 1e-3
