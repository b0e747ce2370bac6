"""One training step of the sparse decoder-free model against one TopK SAE step of the same width, interleaved.

A step is what training does per batch: the objective on N rows, backward, Adam. Both nets are built at the
same D, K and k; the reps alternate (sparse, SAE, sparse, SAE, ...) in one process, so machine load drifts hit
both alike. The last line is the ratio: median sparse step / median TopK SAE step (the bar: <= 1).

    python benchmarks/sparse_step.py                                  # N 4096, K 16384, D 576, k 32
    python benchmarks/sparse_step.py --n 1024 --k-components 4096 --reps 5    # what a slow CPU affords
    python benchmarks/sparse_step.py --net tc_components=1024          # a net setting (--model.net.*)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from implicit_em.models.base import fit_to_data
from implicit_em.models.implicit_em_sparse import ImplicitEMSparse
from implicit_em.models.topk_sae import TopKSAE


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None if text in ("null", "None") else text


def step_fn(net, x: torch.Tensor):
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step() -> float:
        start = time.perf_counter()
        loss = net.objective(x, 0)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="rows per step (default 4096)")
    p.add_argument("--k-components", type=int, default=16384, help="K, the width (default 16384)")
    p.add_argument("--d", type=int, default=576, help="D, the input width (default 576)")
    p.add_argument("--k", type=int, default=32, help="codes kept per input (default 32)")
    p.add_argument("--reps", type=int, default=5, help="timed steps of each, after one warm-up (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--net", nargs="*", default=[], help="settings of the sparse net, name=value")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(a.n, a.d, generator=g) @ torch.randn(a.d, a.d, generator=g) / a.d**0.5).to(a.device)
    settings = {key: _value(v) for key, v in (s.split("=", 1) for s in a.net)}
    ours = ImplicitEMSparse(a.d, a.k_components, a.k, seed=1, **settings)
    sae = TopKSAE(a.d, a.k_components, a.k, seed=1)
    fit_to_data(ours.first_layer(), x.cpu(), 0.3)
    ours, sae = ours.to(a.device), sae.to(a.device)
    steps = {"sparse implicit_em": step_fn(ours, x), "topk_sae": step_fn(sae, x)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(a.reps):
        for name, step in steps.items():
            times[name].append(step())
    print(f"N {a.n}, K {a.k_components}, D {a.d}, k {a.k}, {a.reps} reps, device {a.device}, "
          f"threads {torch.get_num_threads()}, net {settings or 'defaults'}")  # fmt: skip
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t):.3f} s/step (min {min(t):.3f}, max {max(t):.3f})")
    ratio = statistics.median(times["sparse implicit_em"]) / statistics.median(times["topk_sae"])
    print(f"ratio (sparse implicit_em / topk_sae step): {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
