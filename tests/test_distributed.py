"""Multi-process training optimises exactly the single-process objective on the global batch.

Runs real 2-process CPU DDP (gloo): the gradient check spawns processes with torch.multiprocessing and
averages the gradients over ranks as DDP does; the training checks launch scripts/train.py with
configs/trainer/ddp_cpu.yaml (Lightning's DDP) as users do.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from implicit_em.module import ImplicitEM

WORLD = 2
N, D, K = 24, 10, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module() -> ImplicitEM:
    # every term on, the weight term included, so each one's scaling under DDP is checked
    return ImplicitEM(
        in_features=D, n_components=K, lambda_var=0.7, lambda_tc=1.3, lambda_wr=0.5, seed=3, data_init=False
    ).double()


def _batch() -> torch.Tensor:
    return torch.rand(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _ddp_gradient_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        module = _module()
        shard = _batch().chunk(WORLD)[rank]  # rank r holds the r-th contiguous part of the global batch
        module.objective(shard)["loss"].sum().backward()
        for p in module.parameters():  # what DDP does to gradients: average them over the ranks
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        if rank == 0:
            torch.save({n: p.grad.clone() for n, p in module.named_parameters()}, out)
        dist.barrier()  # no rank tears down while another still communicates
    finally:
        dist.destroy_process_group()


def test_ddp_gradient_equals_single_process_gradient_on_the_concatenated_batch(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_gradient_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    ddp = torch.load(out)

    module = _module()
    module.objective(_batch())["loss"].sum().backward()
    for name, p in module.named_parameters():
        rel = (ddp[name] - p.grad).norm() / p.grad.norm()
        assert rel <= 1e-6, (name, float(rel))
    # and the per-shard objective (what plain DDP would optimise) is measurably different
    naive = _module()
    sum(naive.objective(s)["loss"].sum() for s in _batch().chunk(WORLD)).backward()
    w = "model.linear.weights.0"
    assert (dict(naive.named_parameters())[w].grad / WORLD - dict(module.named_parameters())[w].grad).norm() > 1e-3


def _final_weights(run) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run.metrics["checkpoint"], weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def ddp_and_single_runs(tmp_path_factory):
    from tests.conftest import TRAIN, run_script

    common = ["--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false", "--data.drop_last", "true",
              "--report.kmeans", "false", "--report.probe_method", "torch", "--features.every_n_epochs", "0"]  # fmt: skip
    ddp_root, single_root = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("single")
    ddp = run_script(TRAIN, "--config", "configs/trainer/ddp_cpu.yaml", "--trainer.devices", "2",
                     "--trainer.default_root_dir", ddp_root, *common)  # fmt: skip
    single = run_script(
        TRAIN, "--config", "configs/trainer/cpu.yaml", "--trainer.default_root_dir", single_root, *common
    )
    return ddp, single, ddp_root


def test_ddp_training_ends_with_the_single_process_weights(ddp_and_single_runs):
    ddp, single, _ = ddp_and_single_runs
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = _final_weights(ddp), _final_weights(single)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, float((a[k] - b[k]).abs().max()))
    assert ddp.metrics["final_loss"] == pytest.approx(single.metrics["final_loss"], rel=1e-5)


def test_ddp_run_writes_one_metrics_json_and_prints_its_path_once(ddp_and_single_runs):
    ddp, _, root = ddp_and_single_runs
    found = list(root.rglob("metrics.json"))
    assert found == [ddp.metrics_path]
    assert ddp.stdout.count("metrics.json") == 1
    assert len(list(root.rglob("last.ckpt"))) == 1
    assert ddp.metrics["probe_accuracy"] > 0.5
