#!/usr/bin/env bash
# The one prepared GPU check (issue: multi-GPU training): the default model on Fashion-MNIST for a few
# epochs on one GPU with the data on the GPU, then the scale table. Prints epoch times, probe accuracy
# and the GPU's name; everything it writes goes under ${OUT:-/tmp/gpu_check}.
# Usage on a machine with a GPU and the project installed:  bash benchmarks/gpu_check.sh [DATA_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
ROOT=${1:-/usr/share/datasets/fashion-mnist}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
m=$(python scripts/train.py --config configs/data/fashion_mnist.yaml --config configs/trainer/gpu.yaml \
      --data.root "$ROOT" --trainer.max_epochs 5 --trainer.enable_progress_bar false \
      --trainer.default_root_dir "$OUT/runs" --report.kmeans false 2>"$OUT/train.err" | tail -n 1)
cp "$m" "$OUT/metrics.json"
python - "$m" <<'PY'
import json, statistics, sys
m = json.load(open(sys.argv[1]))
e = m["epoch_seconds"]
print(f"device {m['device']}: epoch seconds {[round(s, 3) for s in e]}, median after the first {statistics.median(e[1:]):.3f}; "
      f"probe_accuracy {m['probe_accuracy']:.4f} after {len(e)} epochs; peak memory {m['peak_memory_mb']:.0f} MB")
PY
python benchmarks/scale.py --accelerator gpu | tee "$OUT/scale.md"
