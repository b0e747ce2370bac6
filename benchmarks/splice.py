"""The causal LM's splice on a harvest: a spliced pass that starts after block L (what the evaluation does) against
one that runs the whole model with the replacement hooked in, interleaved in one process.

The windows are the harvest's first ``--windows`` windows (the evaluation takes held-out ones; the cost is the
same per token). Each rep times, on the same batches: the clean pass (the whole model, as a harvest pays it),
the whole-model spliced pass, and the spliced pass that reuses the clean pass's block output. The last line is
the ratio: median spliced pass from block L / median whole-model spliced pass (the fraction of the model after
block L, plus the unembedding, is what it should approach).

    python benchmarks/splice.py --data-root /tmp/smol15 --windows 50 --reps 3
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    from implicit_em.errors import OneLineArgumentParser
    from implicit_em.lm import causal_lm as cl

    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True, help="a causal LM's harvest (scripts/harvest.py)")
    p.add_argument("--windows", type=int, default=50)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=cl.SPLICE_BATCH)
    a = p.parse_args(argv)
    manifest = json.loads((a.data_root / "manifest.json").read_text())
    path = cl.locate_lm(manifest)
    if path is None:
        p.error(cl.install_hint(manifest))
    start = time.perf_counter()
    _, net, _ = cl.cached_lm(path, "cpu")
    print(f"loaded {path.name} in {time.perf_counter() - start:.1f} s", flush=True)
    layer, blocks = int(manifest["layer"]), cl.decoder_blocks(net)
    ids = np.arange(min(a.windows, int(manifest["windows"])))
    windows, masks = cl.windows_and_masks(a.data_root, ids)
    batches = [cl._pad(windows[b : b + a.batch_size], masks[b : b + a.batch_size], 0, "cpu")
               for b in range(0, len(windows), a.batch_size)]  # fmt: skip
    n_tokens = sum(int(attn[:, 1:].sum()) for _, attn, _ in batches)

    def halve(x):
        return 0.5 * x

    def _hooked(ids_, attn, predicted, hook):
        handle = blocks[layer].register_forward_hook(hook)
        try:
            logits = net(input_ids=ids_, attention_mask=attn, use_cache=False).logits
        finally:
            handle.remove()
        return torch.log_softmax(logits[:, :-1][predicted].float(), dim=-1)

    times: dict[str, list[float]] = {"clean": [], "whole": [], "from_block": []}
    with torch.inference_mode():
        for _ in range(a.reps):
            for name in times:
                total = 0.0
                for ids_, attn, replace in batches:
                    predicted = attn[:, 1:].bool()
                    capture = cl._Capture()
                    cl._logprobs(net, blocks, layer, (ids_, attn, replace, predicted), None, capture)  # clean
                    t = time.perf_counter()
                    if name == "clean":
                        cl._logprobs(net, blocks, layer, (ids_, attn, replace, predicted), None, cl._Capture())
                    elif name == "whole":
                        _hooked(ids_, attn, predicted, cl._Splice(replace, halve))
                    else:
                        cl._logprobs(net, blocks, layer, (ids_, attn, replace, predicted), halve, capture)
                    total += time.perf_counter() - t
                times[name].append(total)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>10}: {v:.2f} s for {n_tokens} predicted tokens, {n_tokens / v:.0f} tokens/s")
    print(
        f"block {layer} of {len(blocks)}, {len(windows)} windows, {a.reps} reps, torch threads {torch.get_num_threads()}"
    )
    print(f"ratio spliced pass from block {layer} / whole-model spliced pass: {med['from_block'] / med['whole']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
