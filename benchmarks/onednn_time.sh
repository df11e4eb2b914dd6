#!/usr/bin/env bash
# Where one forward's time goes inside oneDNN: the count and total milliseconds of each oneDNN
# primitive (convolutions, weight reorders, ...) per call, averaged over 5 calls after two
# warm-up calls, from ONEDNN_VERBOSE, beside the whole call's wall time over the same calls (what
# is not oneDNN is torch's own ops: gates, activations, adds); and the model's GFLOP per image (torch's FlopCounterMode, 2 per multiply-add,
# of the re-parameterized model for ParNet). Usage: bash benchmarks/onednn_time.sh MODEL MODE [BATCH] [THREADS]
#   MODEL: a ParNet variant (MODE: any CPU deploy mode) or a timm baseline (MODE: channels_last
#   or frozen). Example: bash benchmarks/onednn_time.sh parnet_s_official packed 1 2
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 mode=$2 batch=${3:-1} threads=${4:-2}
ONEDNN_VERBOSE=1 .venv/bin/python - "$model" "$mode" "$batch" "$threads" <<'PY' |
import sys
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import parnet
from parnet.deployment import deploy, freeze_cpu

name, mode, batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
CALLS = 5
torch.set_num_threads(threads)
model = timm.create_model(name).eval()
if name.startswith("parnet"):
    net = deploy(model, "cpu", mode)
elif mode in ("channels_last", "frozen"):
    net = model.to(memory_format=torch.channels_last)
    net = freeze_cpu(net) if mode == "frozen" else net
else:
    sys.exit(f"baseline mode must be channels_last or frozen, got {mode}")
x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    counter = FlopCounterMode(display=False)
    plain = parnet.reparameterize(model) if name.startswith("parnet") else model
    with counter:
        plain(x[:1])
    net(x)
    net(x)
    print("--- timed calls ---", flush=True)
    start = time.perf_counter()
    for _ in range(CALLS):
        net(x)
    wall = (time.perf_counter() - start) / CALLS * 1e3
print(f"whole forward (wall, verbose logging on): {wall:.1f} ms (mean of {CALLS})", flush=True)
print(f"GFLOP per image (FlopCounterMode): {counter.get_total_flops() / 1e9:.2f}", flush=True)
PY
  sed -n '/--- timed calls ---/,$p' |
  awk -F, '/^GFLOP/ {flops = $0} /^whole forward/ {whole = $0} /^onednn_verbose.*,exec,/ {n[$6]++; t[$6] += $NF}
           END {for (k in n) printf "%-12s %4d calls %9.1f ms per forward (mean of 5)\n", k, n[k] / 5, t[k] / 5
                print whole; print flops}'
