#!/bin/bash
# speed probe 2: base config (0.149 M), 40 steps of 128 each, interleaved: precision x threads; frozen code
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/wt-train/src
base=(--model parnet_cifar_s --model-kwargs 'widths=[8,16,32]' head_width=128 stem_width=8)
for rt in 1:1 1:2 2:1; do
 rep=${rt%%:*}; t=${rt##*:}
 for amp in off bf16; do
   out=/tmp/speed/b-$amp-t$t-$rep; rm -rf $out
   timeout 420 nice -n 19 $PY -m parnet train --dataset fashion_mnist "${base[@]}" --epochs 1 --train-subset 5120 --test-subset 128 \
     --threads $t --workers 1 --amp $amp --no-progress --no-depth --warmup-epochs 0.2 --output $out > $out.log 2>&1
   echo "$(date +%T) $amp t$t rep$rep rc=$? $(grep -o '[0-9]* img/s' $out.log)"
 done
done
