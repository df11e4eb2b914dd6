#!/usr/bin/env bash
# The GPU check: what this project can only check where a CUDA device is present, in one run of
# under 8 minutes on one GPU. Run it first thing when a GPU is lent:
#
#   bash scripts/gpu_check.sh   # writes gpu_check.log, bench*.json/md, train_*.json* to $OUT [gpu_check_out/]
#
# What the GPU machine lacks travels with the tree (both paths are git-ignored; carry them):
#   data/fashion-mnist   cp -r /usr/share/datasets/fashion-mnist data/   (for step 3)
#   .whl/                Python wheels the machine's image lacks (pydantic, which parnet imports, and
#                        its needs), fetched here for its Python 3.12:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       pydantic pydantic-core annotated-types typing-inspection typing-extensions
#
# Steps, each under its own time limit so that one hang cannot eat the others (the limits add up to
# 460 s; the H200 run of 2026-12-04 took 14, 17, 37, 18, 57 and 19 s for the first six, in this order,
# and the suite did not finish in 160 s with 4 workers):
#   1. the machine: GPU, driver, torch/timm/onnxruntime versions, whether TensorRT is installable;
#   2. the CUDA tests (tests marked for CUDA in tests/test_deploy.py);
#   3. one bf16 training epoch of parnet_cifar_s on Fashion-MNIST (data from $FMNIST_DIR, default
#      /usr/share/datasets/fashion-mnist, or data/fashion-mnist in the repository);
#   4. `parnet bench --device cuda`: ParNet-S in each CUDA mode (streams, CUDA graph) against
#      ResNet-34/50 and RepVGG-B1g4, batch 1 and 32, then the compiled modes separately;
#   4b. `parnet bench --device cuda` in bf16 (ParNet-S and ResNet-34/50: channels_last, streams and
#      CUDA graph in bf16 beside their fp32 CUDA graph); TensorRT is reported by step 1 only: neither
#      tensorrt nor torch_tensorrt nor ORT's TensorRT provider is on the GPU machine's image (2026-11-30),
#      and none can travel in .whl/: `pip download tensorrt-cu12` finds no distribution from this
#      machine's package index (2026-12-01);
#   5. the whole suite with CUDA visible (tests that behave differently when a GPU is present), last
#      so that the timings above run on a quiet machine.
# STEPS="machine bench_bf16" runs only the named steps (all by default).
# It uses the python3 on the PATH (the GPU machine's own torch) with src/ on PYTHONPATH: nothing is
# installed. Every step runs even when an earlier one failed; the exit status is the number of steps
# that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # the carried wheels, into a folder of their own
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/parnet-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/parnet-site"
fi
failed=0
run_dir=$(mktemp -d)  # the training run's weights stay out of $OUT (only its results are copied)
trap 'rm -rf "$run_dir"' EXIT
step() {  # step NAME SECONDS COMMAND...: run a step under a time limit, log it, count a failure
  local name=$1 limit=$2
  shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
  echo "== $name (limit ${limit}s) ==" | tee -a "$OUT/gpu_check.log"
  local start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc in $((SECONDS - start))s ==" | tee -a "$OUT/gpu_check.log"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}

if [ -n "${FMNIST_DIR:-}" ]; then :
elif [ -d /usr/share/datasets/fashion-mnist ]; then FMNIST_DIR=/usr/share/datasets/fashion-mnist
else FMNIST_DIR=data/fashion-mnist
fi

step machine 20 bash -c "nvidia-smi; lscpu | grep -E 'Model name|^CPU\(s\)'; $PY - <<'PY'
import importlib.util, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')
for name in ('timm', 'onnxruntime', 'tensorrt', 'torch_tensorrt', 'triton', 'pycocotools'):
    spec = importlib.util.find_spec(name)
    version = getattr(__import__(name), '__version__', '?') if spec else 'not installed'
    print(f'{name}: {version}')
if importlib.util.find_spec('onnxruntime'):
    import onnxruntime
    print('onnxruntime providers:', onnxruntime.get_available_providers())
PY"

step cuda_tests 30 "$PY" -m pytest -q -p no:cacheprovider tests/test_deploy.py -k "cuda or multi_device"

step bf16_epoch 60 "$PY" -m parnet train --dataset fashion_mnist --data-dir "$FMNIST_DIR" --device cuda \
  --amp bf16 --epochs 1 --warmup-epochs 0.2 --workers 8 --no-progress --output "$run_dir/run" \
  --no-depth
cp "$run_dir/run/results.json" "$OUT/train_results.json" 2>/dev/null
cp "$run_dir/run/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null

step bench 35 "$PY" -m parnet bench --device cuda --modes train,fused,channels_last,parallel,cuda_graph \
  --baseline-modes eager,channels_last,cuda_graph --reps 50 --json "$OUT/bench.json" --markdown "$OUT/bench.md"

step bench_compiled 80 "$PY" -m parnet bench --device cuda --modes compiled --baseline-modes compiled \
  --baselines resnet50 --reps 50 --json "$OUT/bench_compiled.json"

step bench_bf16 35 "$PY" -m parnet bench --device cuda --modes cuda_graph,bf16:channels_last,bf16:parallel,bf16:cuda_graph \
  --baselines resnet34,resnet50 --baseline-modes cuda_graph,bf16:channels_last,bf16:cuda_graph --reps 50 \
  --json "$OUT/bench_bf16.json" --markdown "$OUT/bench_bf16.md"

# The whole suite with CUDA visible, 8 workers (tests/conftest.py gives each one torch thread; OMP_NUM_THREADS
# bounds the other libraries' pools: 8 x 16 threads overloaded 16 cores).
# Without pycocotools (not on the GPU machine's image) the detection tests cannot run there.
suite=(-m "not slow")
"$PY" -c "import xdist" 2>/dev/null && suite+=(-n 8)
"$PY" -c "import pycocotools" 2>/dev/null || suite+=(--ignore=tests/test_detection.py)
OMP_NUM_THREADS=2 step test_suite 200 "$PY" -m pytest -q -p no:cacheprovider "${suite[@]}"

echo "gpu_check: $failed step(s) failed"
exit "$failed"
