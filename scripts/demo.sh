#!/usr/bin/env bash
# The main job, a few minutes on a CPU: train a narrow ParNet on Fashion-MNIST (a 12k-image subset, one
# epoch, the paper's recipe), evaluate it (raw, EMA and re-parameterized weights), fuse it, and print the
# result. Run `bash scripts/setup.sh` first. Writes runs/demo/ (replaced on each run).
# Knobs (environment): TRAIN_IMAGES (default 12000), TEST_IMAGES (2000), EPOCHS (1), THREADS (1).
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN_IMAGES=${TRAIN_IMAGES:-12000}
TEST_IMAGES=${TEST_IMAGES:-2000}
EPOCHS=${EPOCHS:-1}
THREADS=${THREADS:-1}
run=runs/demo
rm -rf "$run"  # the demo's own folder only

.venv/bin/parnet train --dataset fashion_mnist --model parnet_cifar_s \
  --model-kwargs 'widths=[8,16,32]' head_width=64 stem_width=8 \
  --epochs "$EPOCHS" --batch-size 64 --lr 0.1 --warmup-epochs 0.1 \
  --train-subset "$TRAIN_IMAGES" --test-subset "$TEST_IMAGES" \
  --threads "$THREADS" --workers 1 --output "$run"
echo
echo "== evaluation of $run on $TEST_IMAGES Fashion-MNIST test images (raw, EMA, re-parameterized) =="
OMP_NUM_THREADS=$THREADS .venv/bin/parnet eval "$run" --test-subset "$TEST_IMAGES" --workers 1
.venv/bin/parnet plot "$run"
echo
OMP_NUM_THREADS=$THREADS .venv/bin/python - "$run" <<'PY'
import json, sys
import torch
import parnet
from parnet.io import load_model

run = sys.argv[1]
fused = load_model(f"{run}/ema_fused.safetensors")  # the deployable model: one 3x3 conv per block
res = json.load(open(f"{run}/results.json"))
x = torch.randn(1, 1, 32, 32)
print(f"ParNet {res['model_kwargs']}: {res['params']:,} params for training, {res['fused_params']:,} after fusion, "
      f"depth {parnet.network_depth(fused, x)}")
# In float32, as `parnet eval` scores (test_top1 is the training's autocast score: bf16 where --amp chose it).
raw, ema = res.get("fp32_top1", res["test_top1"]), res.get("ema_fp32_top1", res["ema_top1"])
print(f"test top-1: raw {raw:.2f}%, EMA {ema:.2f}%, "
      f"fused EMA {res['ema_fused_top1']:.2f}% ({res['ema_fused_prediction_changes']} predictions changed by fusion)")
print(f"trained {res['epochs']} epoch(s) in {res['train_seconds']:.0f} s ({res['train_images_per_s']:.0f} images/s)")
print(f"files: {run}/last.safetensors, {run}/ema_fused.safetensors, {run}/metrics.csv, {run}/curves.png")
PY
