"""Multi-process training optimises exactly the single-process objective on the global batch, under default
settings (the last, partial batch kept and split unevenly across ranks).

The objective under 2-process DDP: every rank holds half of the rows, gathers the distances with gradients
(``gather_samples``) and evaluates the objective on the global batch; the value and the averaged parameter
gradients equal the single-process ones on the whole batch, on both sides of the N < K and D < K switches, and for
the subset estimate drawn from identically seeded generators.

Runs real CPU DDP (gloo): the gradient checks fork processes with torch.multiprocessing and average the
gradients over ranks as DDP does; the training checks launch scripts/train.py as users do, with
configs/trainer/ddp_cpu.yaml (2 processes, on the digits) and as 2 nodes of one process each (MASTER_ADDR,
NODE_RANK, ..., on a folder of activation shards: the streaming loader's DDP parts), each against the one-process
run on the same data made in the test process.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from implicit_em.core.distributed import gather_samples
from implicit_em.core.objective import implicit_em_objective
from implicit_em.eval.diagnostics import ComponentDiagnostics, Redundancy
from implicit_em.models.implicit_em import ImplicitEM
from implicit_em.run.checkpoints import load_checkpoint
from implicit_em.training.module import ComponentModule
from tests.conftest import REPO, TRAIN, Run, main_in_process, run_script
from tests.eval.test_diagnostics import _assert_same, _metrics, _results
from tests.eval.test_diagnostics import _random_distances as _diagnostics_distances
from tests.lm.test_activations import E2E as SHARDS
from tests.lm.test_activations import write_shards

D, K = 10, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker, args: tuple, world: int) -> None:
    """``worker(rank, *args)`` in ``world`` processes, joined. They fork from a fork server that imported this
    module once (spawned ones would import torch and the project again, seconds each; forking this process
    itself can deadlock a child on a lock another of its threads held)."""
    start_forked(worker, args, world)


def start_forked(worker, args: tuple, world: int) -> None:
    """``worker(rank, *args)`` in ``world`` processes forked from a fork server that preloads ``worker``'s
    module, joined."""
    import multiprocessing

    multiprocessing.set_forkserver_preload([worker.__module__])
    mp.start_processes(worker, args=args, nprocs=world, join=True, start_method="forkserver")


# -- the objective: every rank gathers the distances with gradients (gather_samples) and evaluates the
# objective on the global batch, float64 ---------------------------------------------------------------

WORLD = 2
# (global N, K, D, tc_components): N < K and N > K for the decorrelation term, D < K and D > K for the
# weight term, and the subset estimate
CASES = [(24, 40, 10, None), (40, 12, 30, None), (24, 40, 50, None), (40, 12, 8, None), (24, 40, 10, 9)]
LAMBDAS = {"lambda_lse": 0.8, "lambda_var": 0.7, "lambda_tc": 1.3, "lambda_wr": 0.5}


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
    _launch(_worker, (_free_port(), str(out)), WORLD)
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


# -- the module's objective, shards of unequal size (one empty) -------------------------------------------------


def _module() -> ComponentModule:
    # every term on, the weight term included, so each one's scaling under DDP is checked
    net = functools.partial(ImplicitEM, lambda_var=0.7, lambda_tc=1.3, lambda_wr=0.5)
    return ComponentModule(net, in_features=D, n_components=K, seed=3, data_init=False).double()


def _batch(n: int) -> torch.Tensor:
    return torch.rand(n, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _ddp_gradient_worker(rank: int, world: int, sizes: list[int], port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module = _module()
        shard = _batch(sum(sizes)).split(sizes)[rank]  # rank r holds the r-th contiguous part of the global batch
        terms = module.objective(shard)
        terms["loss"].backward()
        for p in module.parameters():  # what DDP does to gradients: average them over the ranks
            dist.all_reduce(p.grad)
            p.grad /= world
        torch.save(
            {"grads": {n: p.grad.clone() for n, p in module.named_parameters()},
             "terms": {n: v.detach() for n, v in terms.items()}},
            f"{out}.{rank}",
        )  # fmt: skip
        dist.barrier()  # no rank tears down while another still communicates
    finally:
        dist.destroy_process_group()


def test_ddp_value_and_gradient_equal_the_single_process_ones_with_uneven_shards(tmp_path):
    sizes = [15, 9, 0]  # uneven, and a rank with no rows (as a last batch of 2 over 4 ranks leaves)
    world, out = len(sizes), str(tmp_path / "ddp")
    _launch(_ddp_gradient_worker, (world, sizes, _free_port(), out), world)
    single = _module()
    terms = single.objective(_batch(sum(sizes)))
    terms["loss"].backward()
    for rank in range(world):
        got = torch.load(f"{out}.{rank}")
        for name, value in terms.items():  # every rank evaluates the global objective
            assert torch.allclose(got["terms"][name], value.detach(), rtol=1e-12, atol=1e-12), (rank, name)
        for name, p in single.named_parameters():
            rel = (got["grads"][name] - p.grad).norm() / p.grad.norm()
            assert rel <= 1e-12, (rank, name, float(rel))
    # and the per-shard objective (what plain DDP would optimise) is measurably different
    naive = _module()
    sum(naive.objective(s)["loss"] for s in _batch(sum(sizes)).split(sizes) if len(s) >= 2).backward()
    w = "model.linear.weight"
    grad = dict(single.named_parameters())[w].grad
    assert (dict(naive.named_parameters())[w].grad / 2 - grad).norm() > 1e-3 * grad.norm()


# -- training: 2 processes (digits), and 2 nodes (activation shards), equal one process under default settings --

#: the evaluation reduced to the fast probe (no KMeans, no SAE numbers): the weights are what is compared
COMMON = ["--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false", "--report.kmeans", "false",
          "--report.probe_method", "torch", "--report.sae_metrics", "false",
          "--components.every_n_epochs", "0"]  # fmt: skip


def _final_weights(metrics: dict) -> dict[str, torch.Tensor]:
    state = load_checkpoint(metrics["checkpoint"])["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.")}


def _assert_same_training(run: Run, single: Run, n_train: int = 1293) -> None:
    assert run.returncode == 0, run.stderr[-3000:]
    m, s = run.metrics, single.metrics
    assert m["final_loss"] == pytest.approx(s["final_loss"], rel=1e-4)
    assert m["n_train"] == s["n_train"] == n_train and n_train % 128 != 0  # a last, partial batch was in play
    a, b = _final_weights(m), _final_weights(s)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, float((a[k] - b[k]).abs().max()))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run, in this process (the multi-process runs below are real processes)."""
    run = main_in_process("--config", "configs/trainer/cpu.yaml", "--trainer.default_root_dir",
                          tmp_path_factory.mktemp("single"), *COMMON)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run = run_script(TRAIN, "--config", "configs/trainer/ddp_cpu.yaml", "--trainer.devices", "2",
                     "--trainer.default_root_dir", root, *COMMON)  # fmt: skip
    return run, root


def test_ddp_training_under_default_settings_equals_one_process(ddp, single):
    _assert_same_training(ddp[0], single)


def test_ddp_run_writes_one_metrics_json_and_prints_its_path_once(ddp):
    run, root = ddp
    assert run.returncode == 0, run.stderr[-2000:]
    assert list(root.rglob("metrics.json")) == [run.metrics_path]
    assert run.stdout.count("metrics.json") == 1
    assert len(list(root.rglob("last.ckpt"))) == 1
    assert run.metrics["probe_accuracy"] > 0.5


def test_two_nodes_of_one_process_on_activation_shards_equal_one_process(tmp_path):
    """Two nodes on this host, as a cluster launcher starts them: one process per node, rendezvous by env
    (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, NODE_RANK), training on a folder of activation shards (each rank
    reads its part of every global batch, the last one partial). Asserts: node 1 exits 0; node 0 exits 0
    and ends with the final loss and the weights of the one-process run on the same shards (made in this
    process); only global rank 0 writes metrics.json."""
    root = tmp_path / "shards"
    write_shards(root, index=False)
    args = [*SHARDS, "--data.root", str(root), *COMMON, "--trainer.max_epochs", "2"]  # the data config first
    single = main_in_process("--config", "configs/trainer/cpu.yaml", "--trainer.default_root_dir",
                             tmp_path / "single", *args)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="offline", MPLBACKEND="Agg", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
               LOCAL_RANK="0")  # fmt: skip
    nodes = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "1",
             "--trainer.num_nodes", "2"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(TRAIN), *nodes, *args, "--trainer.default_root_dir", str(tmp_path / f"n{r}")],
            cwd=REPO,
            env={**env, "NODE_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (1, 0)
    ]
    try:
        results = {r: p.communicate(timeout=600) for r, p in zip((1, 0), procs)}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    node0 = Run(procs[1].returncode, *results[0])
    assert procs[0].returncode == 0, results[1][1][-3000:]
    _assert_same_training(node0, single, n_train=1426)
    assert not list((tmp_path / "n1").rglob("metrics.json"))  # only global rank 0 evaluates and writes


# -- the diagnostics synced across ranks -----------------------------------------------------------------------


def _metrics_worker(rank: int, world: int, port: int, shards: list, k: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = _metrics(k)
        diagnostics = ComponentDiagnostics(k)
        estimate = Redundancy(k, max_exact=3, subset=4)
        for chunk in shards[rank].split(17):  # several updates per rank
            for m in [*metrics.values(), estimate]:
                m.update(chunk)
            diagnostics.update(chunk)
        results = _results(metrics)
        results.update({f"diag/{key}": v for key, v in diagnostics.compute().items()})
        results.update({f"estimate/{key}": v for key, v in estimate.compute().items()})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears down while another still communicates
    finally:
        dist.destroy_process_group()


def test_metrics_under_ddp_equal_single_process_on_concatenated_data(tmp_path):
    """The diagnostics (tests/eval/test_diagnostics.py) synced over 2 ranks of uneven shards equal one process
    on their concatenation (here, to share this file's fork server)."""
    k = 6
    d = _diagnostics_distances(91, k, seed=2)
    shards = [d[:50], d[50:]]  # uneven shards
    _launch(_metrics_worker, (2, _free_port(), shards, k, str(tmp_path)), 2)
    single = _metrics(k)
    for m in single.values():
        m.update(d)
    expected = _results(single)
    diag = ComponentDiagnostics(k, sync_on_compute=False)
    diag.update(d)
    expected.update({f"diag/{key}": v for key, v in diag.compute().items()})
    estimate = Redundancy(k, max_exact=3, subset=4, sync_on_compute=False)
    estimate.update(d)
    expected.update({f"estimate/{key}": v for key, v in estimate.compute().items()})
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        _assert_same(got, expected)
    # the shards alone differ from the whole: the test would notice a missing sync
    alone = _metrics(k)
    for m in alone.values():
        m.update(shards[0])
    assert not torch.allclose(_results(alone)["redundancy"], expected["redundancy"])
