#!/usr/bin/env bash
# The CPU benchmark behind RESULTS.md, "Inference latency and throughput".
#
# ParNet-S (the authors' released architecture, parnet_s_official) in training form, fused and in
# every CPU deploy mode, against ResNet-34, ResNet-50 and RepVGG-B1g4 (re-parameterized), each in
# eager, channels_last, packed, winograd, frozen and channels_last + torch.compile; batch 1 (latency) and batch 32
# (throughput) at 224x224 with 2 intra-op threads, every (model, mode) timed interleaved in one
# run. Prints the table and whether the issue's targets were met; writes cpu.{json,md} and cpu_latency.png
# into OUT (default: a new folder benchmarks/results/run_cpu-<UTC time>, so that no committed result is
# replaced; an OUT that already holds cpu.json is refused). Extra arguments go to
# `parnet bench` (e.g. --reps 50). About 15 minutes on a quiet 2-core machine, most of it
# torch.compile (inductor caches its kernels, so a second run compiles faster).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/run_cpu-$(date -u +%Y%m%dT%H%M%S)}
if [ -e "$OUT/cpu.json" ]; then
  echo "run_cpu.sh: $OUT already holds cpu.json: give another OUT (the results of a run are not replaced)" >&2
  exit 2
fi
mkdir -p "$OUT"
.venv/bin/parnet bench \
  --models parnet_s_official \
  --baselines resnet34,resnet50,repvgg_b1g4 \
  --device cpu --threads 2 --batch 32 --resolution 224 \
  --reps 20 --reps-large 5 --warmup 2 \
  --json "$OUT/cpu.json" --markdown "$OUT/cpu.md" --plot "$OUT/cpu_latency.png" \
  "$@"
