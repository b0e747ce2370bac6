"""The scale table: one training step (forward and backward) of the decoder-free model as K grows.

Cells: K = 64 ... 65,536 for D = 784 and 3072 at N = 128, and the SAE regime N = 4096, D = 384 and 768,
K = 16,384 and 65,536. Each cell runs in a fresh process (so its peak memory is its own) and measures, as
the minimum over interleaved repetitions in that one process:
- the step with the default objective (L_LSE + L_var + L_tc, the decorrelation term exact) and the same
  step without the decorrelation term: their ratio is the headline;
- in the SAE regime also the step with the decorrelation term estimated from ``--tc-components`` random
  components (``implicit_em_objective(..., tc_components=m)``), and a standard SAE step of the same width
  and batch (ReLU encoder + linear decoder + MSE + L1): "estimate / SAE" compares this model's full step
  with it.
A step is d = relu(x W^T + b), the objective, backward (as ``../shared/checks/scale`` times it; the
optimiser update is the same for both models and left out). Peak memory: the process's resident set
after the headline step (exact term at N = 128, estimate in the SAE regime) on a CPU, including Python
and torch (~0.3 GB); torch's peak allocation on a GPU. Prints a markdown table.

    python benchmarks/scale.py --quick               # 6 cells, about 10 minutes on 2 busy CPU cores
    python benchmarks/scale.py                       # the full table (CPU: hours; GPU: minutes)
    python benchmarks/scale.py --regime sae --k 16384 --d 384
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL_BATCH = {"n": 128, "d": [784, 3072], "k": [64, 256, 1024, 4096, 8192, 16384, 65536]}
SAE_REGIME = {"n": 4096, "d": [384, 768], "k": [16384, 65536]}
QUICK = [(128, 784, k) for k in (1024, 4096, 8192, 65536)] + [(128, 3072, 4096), (4096, 384, 16384)]


def _device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_cell(n: int, d_in: int, k: int, m: int, sae: bool, exact_tc: bool, reps: int, device) -> dict:
    """Step times (seconds, min over ``reps`` interleaved repetitions) and peak memory of one cell."""
    sys.path.insert(0, str(SRC))
    from implicit_em.core.objective import implicit_em_objective, sae_objective

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, d_in, generator=g).to(device)
    w = (torch.randn(k, d_in, generator=g) / d_in**0.5).to(device).requires_grad_(True)
    b = torch.zeros(k, device=device, requires_grad=True)
    tc_gen = torch.Generator(device=device).manual_seed(1)

    def model_step(**kw):
        w.grad = b.grad = None
        implicit_em_objective(torch.relu(x @ w.T + b), **kw)["loss"].backward()

    steps = {"without": lambda: model_step(lambda_tc=0.0)}
    if exact_tc:
        steps["exact"] = lambda: model_step()
    if sae:
        steps["estimate"] = lambda: model_step(tc_components=m, generator=tc_gen)
        dec = (torch.randn(d_in, k, generator=g) / k**0.5).to(device).requires_grad_(True)
        dec_b = torch.zeros(d_in, device=device, requires_grad=True)

        def sae_step():
            w.grad = b.grad = dec.grad = dec_b.grad = None
            codes = torch.relu(x @ w.T + b)
            sae_objective(x, codes @ dec.T + dec_b, codes)["loss"].backward()

        steps["sae"] = sae_step

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    headline = "estimate" if sae else "exact"
    order = [headline] + [s for s in steps if s != headline] if headline in steps else list(steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = {name: timed(steps[name]) for name in order[:1]}  # the headline step first: its peak memory
    peak = _peak_mb(device)
    best.update({name: timed(steps[name]) for name in order[1:]})  # warm-up of the others
    for _ in range(reps):
        for name in order:
            best[name] = min(best[name], timed(steps[name]))
    return {"n": n, "d": d_in, "k": k, "m": m, "peak_mb": peak, "device": str(device), **best}


def run_cell(args, n: int, d_in: int, k: int) -> dict:
    """One cell in a fresh Python process (honest peak memory)."""
    sae = n >= 1024
    cmd = [
        sys.executable, __file__, "--cell", str(n), str(d_in), str(k), "--tc-components", str(args.tc_components),
        "--reps", str(args.reps), "--accelerator", args.accelerator,
    ]  # fmt: skip
    if sae and not args.sae_exact:
        cmd.append("--no-exact")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"n": n, "d": d_in, "k": k, "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ms(cell: dict, key: str) -> str:
    return f"{cell[key] * 1e3:,.0f}" if key in cell else "-"


def _ratio(cell: dict, a: str, b: str) -> str:
    return f"**{cell[a] / cell[b]:.2f}x**" if a in cell and b in cell else "-"


def table_row(c: dict) -> str:
    if "error" in c:
        return f"| {c['n']} | {c['d']} | {c['k']:,} | failed: {c['error']} |"
    return (
        f"| {c['n']} | {c['d']} | {c['k']:,} | {_ms(c, 'without')} | {_ms(c, 'exact')} | {_ratio(c, 'exact', 'without')}"
        f" | {_ms(c, 'estimate')} | {_ratio(c, 'estimate', 'without')} | {_ms(c, 'sae')}"
        f" | {_ratio(c, 'estimate', 'sae')} | {c['peak_mb']:,.0f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", choices=["all", "small", "sae"], default="all", help="N = 128 cells, SAE cells, or both")
    p.add_argument("--k", type=int, nargs="+", help="only these K")
    p.add_argument("--d", type=int, nargs="+", help="only these D")
    p.add_argument("--quick", action="store_true", help=f"only the cells {QUICK}")
    p.add_argument("--tc-components", type=int, default=1024, help="m of the decorrelation estimate (SAE regime)")
    p.add_argument("--sae-exact", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the exact decorrelation term in the SAE regime (default: not with --quick)")  # fmt: skip
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per step after one warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    p.add_argument("--cell", type=int, nargs=3, metavar=("N", "D", "K"), help=argparse.SUPPRESS)
    p.add_argument("--no-exact", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cell:
        n, d_in, k = args.cell
        cell = measure_cell(
            n, d_in, k, args.tc_components, n >= 1024, not args.no_exact, args.reps, _device(args.accelerator)
        )
        print(json.dumps(cell))
        return
    args.sae_exact = not args.quick if args.sae_exact is None else args.sae_exact
    if args.quick:
        cells = QUICK
    else:
        regimes = {"small": [SMALL_BATCH], "sae": [SAE_REGIME], "all": [SMALL_BATCH, SAE_REGIME]}[args.regime]
        cells = [(r["n"], d, k) for r in regimes for d in r["d"] for k in r["k"]]
    cells = [c for c in cells if (not args.k or c[2] in args.k) and (not args.d or c[1] in args.d)]
    m = args.tc_components
    print(f"Step = forward + backward, minimum of {args.reps} interleaved repetitions after a warm-up; "
          f"estimate: the decorrelation term from m = {m} random components.\n")  # fmt: skip
    print("| N | D | K | without L_tc (ms) | exact L_tc (ms) | exact / without | estimate (ms) | estimate / without"
          " | standard SAE (ms) | estimate / SAE | peak memory (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    device = None
    for n, d_in, k in cells:
        cell = run_cell(args, n, d_in, k)
        device = cell.get("device", device)
        print(table_row(cell), flush=True)
    print(f"\ndevice: {device}; command: python benchmarks/scale.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
