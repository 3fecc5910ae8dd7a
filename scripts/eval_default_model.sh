#!/usr/bin/env bash
# Re-run every measurement of docs/results.md for the default model (samkit-tiny) on the
# shared evaluation sets: the four protocols, the bf16 / ONNX fp32 / ONNX int8 rows and the
# speed benchmark. About 25 min on 2 CPU cores. Writes runs/eval/ (JSON, Markdown, plots).
#
#   bash scripts/eval_default_model.sh [../shared/data]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}
out=runs/eval
mkdir -p "$out"
export OMP_WAIT_POLICY=PASSIVE

python benchmarks/default_model.py --reps 10 --threads 2 | tee "$out/speed.txt"
samkit export-onnx --model samkit-tiny -o "$out/onnx" --quantize int8
samkit eval points --data "$data/grabcut" --bf16 --onnx "$out/onnx" --json "$out/points_grabcut.json"
samkit eval points --data "$data/coco_mval" --bf16 --onnx "$out/onnx" --json "$out/points_coco_mval.json"
samkit eval instances --data "$data/coco_tiny_val2017" --oracle-boxes --json "$out/instances_coco_tiny.json"
samkit eval proposals --data "$data/coco_tiny_val2017" --points-per-side 16 --json "$out/proposals_coco_tiny.json"
samkit eval edges --data "$data/bsds500" --limit 10 --json "$out/edges_bsds500_model.json"
# Baselines (model-independent; slow: OpenCV GrabCut takes about 1 s per click).
if [ "${BASELINES:-0}" = 1 ]; then
  samkit eval points --data "$data/grabcut" --no-model --baseline grabcut --max-clicks 5 \
    --json "$out/grabcut_baseline_grabcut.json"
  samkit eval points --data "$data/coco_mval" --no-model --baseline grabcut --max-clicks 3 \
    --json "$out/grabcut_baseline_coco_mval.json"
fi
