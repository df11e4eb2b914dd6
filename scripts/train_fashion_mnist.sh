#!/usr/bin/env bash
# The Fashion-MNIST runs of RESULTS.md ("Fashion-MNIST classification"): a narrow ParNet and ResNet-20,
# same recipe (the paper's: SGD momentum, cosine with warm-up, label smoothing 0.1, RandAugment
# rand-m9-mstd0.5, random erasing 0.25, EMA), same epoch budget, the full 60k training set, scored on
# the full 10k test set. Usage: bash scripts/train_fashion_mnist.sh [parnet|resnet20|all] (default all,
# one after the other; run it again to continue where a kill stopped it). EPOCHS=N changes the budget; THREADS=N the torch threads (1 was fastest on the
# shared 2-core machine of RESULTS.md: 2 threads ran 3-5x slower while other jobs used the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-8}
THREADS=${THREADS:-1}
which=${1:-all}
# --amp off: the recorded runs trained in float32; `auto` now picks bf16 on a CPU where it is faster.
common=(--dataset fashion_mnist --epochs "$EPOCHS" --batch-size 128 --lr 0.1 --warmup-epochs 0.2
        --threads "$THREADS" --workers 1 --seed 0 --amp off)
train() {  # train OUT ARGS...: a new run, or the rest of an interrupted one (a finished run is left as it is)
  local out=$1 resume=()
  shift
  if [ -f "$out/results.json" ]; then echo "$out: finished already"; return 0; fi
  if [ -f "$out/last_state.pt" ] || [ -f "$out/config.yaml" ]; then resume=(--resume); fi
  .venv/bin/parnet train "${common[@]}" "$@" --output "$out" "${resume[@]}"
  .venv/bin/parnet plot "$out"
}
if [ "$which" = parnet ] || [ "$which" = all ]; then
  train runs/fmnist-parnet-e"$EPOCHS" --model parnet_cifar_s --model-kwargs 'widths=[12,24,48]' head_width=192 stem_width=12
fi
if [ "$which" = resnet20 ] || [ "$which" = all ]; then
  train runs/fmnist-resnet20-e"$EPOCHS" --model resnet20_cifar
fi
