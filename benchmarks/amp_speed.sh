#!/usr/bin/env bash
# bf16 against fp32 training speed on this CPU (issue 14, point 6), and what `--amp auto` picks:
# the 0.33 M ParNet of the issue (parnet_cifar_s, widths 12/24/48) trains one epoch of 5,120
# Fashion-MNIST images with --amp off, bf16 and auto, in rotation, REPS times (default 2), 2
# threads. Prints each run's training images/s (the epoch's own figure from its log) and its
# precision. Stop anything else that runs first: this is a timing. bf16 is refused on a CPU without
# native bf16 (its line then says rc=2). Usage: bash benchmarks/amp_speed.sh [REPS]
set -uo pipefail
cd "$(dirname "$0")/.."
reps=${1:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model=(--model parnet_cifar_s --model-kwargs 'widths=[12,24,48]' head_width=192 stem_width=12)
grep -m1 'model name' /proc/cpuinfo
echo "native bf16: $(grep -o -m1 'avx512_bf16\|amx_bf16' /proc/cpuinfo || echo none)"
for rep in $(seq "$reps"); do
  for amp in off bf16 auto; do
    out=$work/$amp-$rep
    .venv/bin/parnet train --dataset fashion_mnist "${model[@]}" --epochs 1 --train-subset 5120 \
      --test-subset 128 --threads 2 --workers 1 --amp "$amp" --no-progress --no-depth --warmup-epochs 0.2 \
      --output "$out" > "$out.log" 2>&1
    rc=$?
    speed=$(grep -o '[0-9.]* img/s' "$out.log" | tail -1)
    precision=$(grep -o '"amp": "[a-z0-9]*"' "$out/results.json" 2>/dev/null || echo '"amp": ?')
    echo "$(date +%T) --amp $amp rep $rep: rc=$rc ${speed:-no speed} $precision"
  done
done
