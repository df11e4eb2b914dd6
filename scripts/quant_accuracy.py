"""fp32 against bf16 and int8 top-1 on the full Fashion-MNIST test set, every engine, for trained models.

    PYTHONPATH=src python scripts/quant_accuracy.py RUN_DIR [RUN_DIR ...] --out results/quant/accuracy.json

Each run's EMA weights (when kept) are scored in fp32 (the plain model), then deployed: int8 by ONNX
Runtime (min-max, percentile and entropy calibration), OpenVINO + NNCF and PT2E (X86InductorQuantizer,
inductor), bf16 in PyTorch and OpenVINO. Calibration: the first N training images, test transforms.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch

from parnet.data import build_datasets
from parnet.deployed import build, calibration_loader, load_trained
from parnet.deployment import deploy, fold
from parnet.deployment.engines import openvino_module
from parnet.deployment.quantize import Bf16Module, pt2e_int8
from parnet.io import atomic_write
from parnet.loaders import build_loaders
from parnet.model import ParNet
from parnet.scoring import evaluate_model


def variants(model, calibration, example):
    """(name, builder) of every low-precision form of ``model``."""
    parnet = isinstance(model, ParNet)
    batches = [x for x, _ in calibration]
    out = [
        (f"int8 onnxruntime {m}", lambda m=m: build(model, "onnxruntime", "int8", batches, example, method=m))
        for m in ("minmax", "percentile", "entropy")
    ]
    out.append(("int8 openvino (NNCF)", lambda: build(model, "openvino", "int8", batches, example)))
    if parnet:  # the same without FoldedParNet.shift_activations
        signed = lambda: openvino_module(  # noqa: E731
            fold(model), example, "int8", batches, torch.get_num_threads(), unsigned_activations=False
        )
        out.append(("int8 openvino signed", signed))
        out.append(("int8 compiled (PT2E)", lambda: deploy(model, "cpu", "compiled", "int8", batches)))
        out.append(("bf16 packed", lambda: deploy(model, "cpu", "packed", "bf16")))
    else:
        from torch.fx.experimental.optimization import fuse

        out.append(("int8 compiled (PT2E)", lambda: pt2e_int8(fuse(model), batches)))
        cl = lambda: copy.deepcopy(model).to(memory_format=torch.channels_last)  # noqa: E731 - Bf16Module casts in place
        out.append(("bf16 channels_last", lambda: Bf16Module(cl()).eval()))
    out.append(("bf16 openvino", lambda: build(model, "openvino", "bf16", None, example)))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="", help="only the variants whose name contains one of these (comma list)")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    doc = {"calibration_images": args.calibration_images, "rows": []}
    for run in args.runs:
        model, trained = load_trained(run)
        dataset = trained.dataset or "fashion_mnist"  # an older weights file names none; this script's is Fashion-MNIST
        data_dir, size = trained.data_dir, trained.img_size
        _, test_set, _ = build_datasets(dataset, data_dir, img_size=size)
        _, loader, _ = build_loaders(test_set, test_set, 1, 0, eval_batch_size=250)
        calibration = list(calibration_loader(dataset, data_dir, args.calibration_images, img_size=size))
        example = next(iter(loader))[0][:1]
        ref = evaluate_model(model, loader)
        print(run, "fp32", ref["top1"], flush=True)
        doc["rows"].append({"run": run, "variant": "fp32", "top1": ref["top1"], "n": ref["n"], "changes": 0})
        wanted = [w for w in args.variants.split(",") if w]
        for name, make in variants(model, calibration, example):
            if wanted and not any(w in name for w in wanted):
                continue
            start = time.perf_counter()
            res = evaluate_model(make(), loader)
            row = {
                "run": run,
                "variant": name,
                "top1": res["top1"],
                "n": res["n"],
                "changes": int((res["preds"] != ref["preds"]).sum()),
                "delta": res["top1"] - ref["top1"],
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(json.dumps(row), flush=True)
            doc["rows"].append(row)
        with atomic_write(args.out) as tmp:
            tmp.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
