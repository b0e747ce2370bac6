#!/usr/bin/env python
"""Harvest one layer of a transformers model over text into activation shards for ``--config
configs/data/activations.yaml --data.root OUT``.

    python scripts/harvest.py --model PATH_OR_ID --layer L --text FILE [FILE ...] --out DIR [--separator LINE]
        [--max_tokens N] [--context 128] [--batch_size 32] [--dtype float16]

Needs the extra: pip install -e ".[activations]". Run again with the same arguments to resume an interrupted
harvest. Prints the output directory as the last stdout line.
"""

import argparse
import sys

from implicit_em.errors import exit_with_argument_error, report_user_error


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        exit_with_argument_error(message)


def main() -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a transformers model directory or Hub id")
    p.add_argument("--layer", required=True, type=int, help="0: the embeddings' output; L: the output of block L")
    p.add_argument("--text", required=True, nargs="+", help="text files; each file's name is its documents' label")
    p.add_argument("--out", required=True, help="the output directory (new, empty, or an unfinished harvest)")
    p.add_argument("--separator", help="a line that separates documents in a file (e.g. %%); default: whole files")
    p.add_argument("--max_tokens", type=int, help="at most this many tokens in all, shared evenly by the files")
    p.add_argument("--context", type=int, default=128, help="tokens per model input, special tokens included")
    p.add_argument("--batch_size", type=int, default=32, help="model inputs per forward pass")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"], help="of the shards")
    p.add_argument("--shard_rows", type=int, default=100_000, help="rows per shard (about)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    args = p.parse_args()
    try:  # this process's choice: no per-weight loading bar from transformers (its absence is reported below)
        from transformers.utils import logging

        logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from implicit_em.harvest import harvest

        manifest = harvest(
            args.model, args.layer, args.text, args.out, separator=args.separator, max_tokens=args.max_tokens,
            context=args.context, batch_size=args.batch_size, dtype=args.dtype, shard_rows=args.shard_rows,
            device=args.device,
        )  # fmt: skip
    except Exception as e:  # settings or data a user can fix: one line, their exit code
        return report_user_error(e)
    print(
        f"harvested {manifest['tokens']} tokens of {manifest['documents']} documents into {len(manifest['shards'])} "
        f"shard(s): layer {manifest['layer']}, d_model {manifest['d_model']}, {manifest['dtype']}, "
        f"{manifest['seconds']:.1f} s",
        file=sys.stderr,
    )
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
