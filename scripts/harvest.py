#!/usr/bin/env python
"""Harvest one layer of a transformers model over text into activation shards for ``--config
configs/data/activations.yaml --data.root OUT``.

    python scripts/harvest.py --model PATH_OR_ID_OR_GGUF --layer L --text SOURCE [SOURCE ...] --out DIR
        [--separator LINE] [--max_tokens N] [--context 128] [--batch_size 32] [--lm_dtype bfloat16]
        [--dtype bfloat16] [--shard_rows 100000] [--threads N] [--no-prepend_bos] [--part I --parts N]

A SOURCE is a text file, a folder of HTML pages (e.g. /usr/share/doc/python3.11/html: each page's visible text is
one document; one label) or a quoted glob (one label per text file). --lm_dtype is the precision the model runs in
(default: bfloat16 for a causal LM where the device computes in it natively, a GPU or a CPU with AVX-512 BF16 or
AMX; float32 elsewhere and for an encoder; the spliced evaluation runs the LM in the same precision), --dtype the
shards' (default bfloat16 for a bfloat16 model, float16 for float32).

Needs the extra: pip install -e ".[activations]" (a .gguf file also needs gguf). For a causal LM (a .gguf file,
or a folder of a ...ForCausalLM) --layer L is the residual stream after block L, 0-based (SAELens'
blocks.L.hook_resid_post); for an encoder, 0 is the embeddings' output and L the output of the L-th block.
Run again with the same arguments to resume an interrupted harvest (kill -9 included). With --part I --parts N,
N processes with the same --out harvest disjoint documents; the last to finish writes manifest.json. Prints the
output directory as the last stdout line.
"""

import argparse
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")  # no bar from transformers' GGUF de-quantisation (read at tqdm's import)

from implicit_em.errors import OneLineArgumentParser, report_user_error


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a transformers model directory, a .gguf file or a Hub id")
    p.add_argument(
        "--layer", required=True, type=int,
        help="causal LM: the output of block L (0-based); encoder: 0 the embeddings' output, L the L-th block's",
    )  # fmt: skip
    p.add_argument(
        "--text", required=True, nargs="+",
        help="text files and folders of HTML pages (one label each), quoted globs (one label per text file)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="the output directory (new, empty, or an unfinished harvest)")
    p.add_argument("--separator", help="a line that separates documents in a file (e.g. %%); default: whole files")
    p.add_argument("--max_tokens", type=int, help="at most this many tokens in all, shared evenly by the sources")
    p.add_argument("--context", type=int, default=128, help="tokens per model input, special tokens included")
    p.add_argument("--batch_size", type=int, default=32, help="model inputs per forward pass")
    p.add_argument(
        "--lm_dtype", choices=["bfloat16", "float32"],
        help="the model's precision (default: bfloat16 for a causal LM where the device computes in it natively)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=["float16", "float32", "bfloat16"],
        help="of the shards (default: bfloat16 for a bfloat16 model, float16 for a float32 one)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads (default: the CPU cores this process may use)")
    p.add_argument("--shard_rows", type=int, default=100_000, help="rows per shard (about)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument(
        "--prepend_bos", action=argparse.BooleanOptionalAction, default=None,
        help="causal LMs: put the BOS token first in every window (default: when the tokenizer has one); the BOS "
        "position is never a row",
    )  # fmt: skip
    p.add_argument("--part", type=int, default=0, help="this process's part, 0 to --parts - 1")
    p.add_argument("--parts", type=int, default=1, help="processes harvesting disjoint documents into one --out")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"argument --threads: must be >= 1 (got {args.threads})")
    import torch

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    try:  # this process's choice: no per-weight loading bar from transformers (its absence is reported below)
        from transformers.utils import logging

        logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from implicit_em.lm.harvest import harvest

        manifest = harvest(
            args.model, args.layer, args.text, args.out, separator=args.separator, max_tokens=args.max_tokens,
            context=args.context, batch_size=args.batch_size, dtype=args.dtype, shard_rows=args.shard_rows,
            device=args.device, prepend_bos=args.prepend_bos, part=args.part, parts=args.parts,
            lm_dtype=args.lm_dtype,
        )  # fmt: skip
    except Exception as e:  # settings or data a user can fix: one line, their exit code
        return report_user_error(e)
    if manifest.get("all_parts") is False:
        print(
            f"part {args.part} of {args.parts}: {manifest['tokens']} tokens; waiting for the other parts",
            file=sys.stderr,
        )
        print(args.out)
        return 0
    print(
        f"harvested {manifest['tokens']} tokens of {manifest['documents']} documents into {len(manifest['shards'])} "
        f"shard(s): layer {manifest['layer']} ({manifest.get('hook_name')}), d_model {manifest['d_model']}, "
        f"{manifest.get('lm_dtype', 'float32')} model, {manifest['dtype']} shards, {manifest['seconds']:.1f} s "
        f"({manifest['tokens'] / max(manifest['seconds'], 1e-9):.0f} tokens/s)",
        file=sys.stderr,
    )
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
