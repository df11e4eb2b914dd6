#!/usr/bin/env bash
# The Detection runs of RESULTS.md: a synthetic Fashion-MNIST detection set, then FCOS on a narrow
# ParNet and on a narrow ResNet-18 (both with an FPN; same data, schedule, FPN and head), trained
# side by side with one thread each, then eval-det on the validation split.
# Usage: bash scripts/train_detection.sh [EPOCHS] (default 8); outputs in runs/det_*/.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-8}
DET=(.venv/bin/parnet)
DATA=data/fmnist_det
# instances_val.json is written last: without it the set is incomplete and is regenerated
[ -f $DATA/annotations/instances_val.json ] || "${DET[@]}" make-det-dataset $DATA --train 2000 --val 300 --canvas 128 --seed 0 --overwrite
COMMON=(--data $DATA --detector fcos --fpn-channels 64 --epochs "$EPOCHS" --batch-size 16 --lr 1e-3
        --weight-decay 0.05 --warmup-steps 100 --seed 0 --device cpu)
run() {  # name backbone KEY=VALUE...
  local resume=
  [ -f runs/det_$1/last_state.pt ] && resume=--resume
  OMP_NUM_THREADS=1 "${DET[@]}" train-det "${COMMON[@]}" --output runs/det_$1 --backbone $2 --backbone-kwargs "${@:3}" $resume
  OMP_NUM_THREADS=1 "${DET[@]}" eval-det runs/det_$1 --data $DATA --split val --no-progress --score-thresh 0.5
}
mkdir -p runs
run parnet parnet_s 'widths=[16,32,64]' head_width=256 stem_width=64 > runs/det_parnet.log 2>&1 &
parnet=$!
run resnet18 resnet18 'channels=[16,32,64,128]' stem_width=16 > runs/det_resnet18.log 2>&1 &
resnet=$!
status=0  # a bare `wait` returns 0 even when a run failed
wait $parnet || { status=1; echo "det_parnet failed, see runs/det_parnet.log" >&2; }
wait $resnet || { status=1; echo "det_resnet18 failed, see runs/det_resnet18.log" >&2; }
exit $status
