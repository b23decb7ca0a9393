"""No-training PTQ algorithms on the demo's depthwise "PTQ-fails" net (issue 19).

The net: ``DWSepCNN`` of ``bench_qat_accuracy.py`` (MobileNet-style depthwise-separable
CNN trained on Fashion-MNIST, cached in the quantlab cache) deployed as TensorRT
builds it: BatchNorm folded into the convs (``torch.nn.utils.fusion.fuse_conv_bn_eval``)
and ONE weight scale per tensor. Folding gives the depthwise channels very different
magnitudes, so per-tensor weights and entropy-clipped activations lose points
(issue 19: 8.97 with entropy).

For every algorithm set (``--algorithms-sets``, ``;`` between sets, ``,`` inside one)
and every calibrator: the PTQ pipeline (``quantlab.pipeline.run``) on the 1,024
``fmnist:calib`` images, top-1 on the full 10,000-image test set (PyTorch fake
quantization, the grid of the exported Q/DQ graph), the share of the set-less loss
recovered, and the seconds of each stage.

Examples:
    nice -n 5 .venv/bin/python benchmarks/bench_ptq_algorithms.py --threads 2
    .venv/bin/python benchmarks/bench_ptq_algorithms.py --calibrators entropy \\
        --algorithms-sets "none;adaround" --algorithm-params '{"adaround": {"iterations": 500}}'
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, emit, machine_header, markdown_table, setup_torch  # noqa: E402
from bench_qat_accuracy import accuracy, trained_dwsep  # noqa: E402

import quantlab as ql  # noqa: E402
from quantlab.algorithms import list_algorithms, parse_algorithms  # noqa: E402
from quantlab.batching import forward_loop  # noqa: E402
from quantlab.data import load_fmnist  # noqa: E402
from quantlab.pipeline.run import run  # noqa: E402

DEFAULT_SETS = "none;bias-correction;adaround;adaround,bias-correction"
CLE_SETS = ";cle;cle,bias-correction;cle,adaround,bias-correction"


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Conv -> BatchNorm pairs of ``model.features`` folded (BN replaced by Identity), as TensorRT deploys them."""
    folded = copy.deepcopy(model).eval()
    layers = list(folded.features)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.Conv2d) and isinstance(layers[i + 1], nn.BatchNorm2d):
            folded.features[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(layers[i], layers[i + 1])
            folded.features[i + 1] = nn.Identity()
    return folded


def parse_sets(text: str) -> List[List[str]]:
    sets = []
    for part in text.split(";"):
        names = [n.strip() for n in part.split(",") if n.strip() and n.strip().lower() != "none"]
        sets.append(names)
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--algorithms-sets", default=None,
                        help=f"';'-separated sets of ','-separated algorithms (default: {DEFAULT_SETS!r}, "
                             f"plus {CLE_SETS[1:]!r} when 'cle' is registered)")
    parser.add_argument("--calibrators", default="max,percentile,mse,entropy")
    parser.add_argument("--algorithm-params", default="{}", help="JSON: algorithm -> {param: value}")
    parser.add_argument("--test-samples", type=int, default=10000)
    args = parser.parse_args()
    device = setup_torch(args)
    text = args.algorithms_sets or (DEFAULT_SETS + (CLE_SETS if "cle" in list_algorithms() else ""))
    sets = parse_sets(text)
    for names in sets:
        parse_algorithms(names)  # unknown names fail here, before any work
    algorithm_params: Dict[str, Dict[str, Any]] = json.loads(args.algorithm_params)
    calibrators = [c.strip() for c in args.calibrators.split(",") if c.strip()]

    x, y = load_fmnist("train")
    fp32 = fold_batchnorm(trained_dwsep(TensorDataset(x, y))).to(device)
    del x, y
    tx, ty = load_fmnist(f"test[:{args.test_samples}]")
    tx, ty = tx.to(device), ty.to(device)
    cx, cy = load_fmnist("calib")
    calib = DataLoader(TensorDataset(cx, cy), batch_size=128)
    fp32_acc = accuracy(fp32, tx, ty)
    base_config = ql.int8_config(per_channel_weights=False)

    rows: List[list] = [["FP32", "-", fp32_acc, 0.0, "-", "-", "-"]]
    baseline: Dict[str, float] = {}
    best: Dict[str, Any] = {}
    for names in sets:
        label = ",".join(names) or "none"
        for calibrator in calibrators:
            model = copy.deepcopy(fp32)
            params = {n: algorithm_params.get(n, {}) for n in names}
            config = dataclasses.replace(base_config, algorithms=tuple(names), algorithm_params=params)
            cparams = {"percentile": 99.99} if calibrator == "percentile" else {}
            start = time.perf_counter()
            result = run(model, forward_loop(calib), {calibrator: cparams}, config=config, cuda_graphs=False)
            total = time.perf_counter() - start
            acc = accuracy(model, tx, ty)
            if not names:
                baseline[calibrator] = acc
            lost = fp32_acc - baseline.get(calibrator, float("nan"))
            recovered = (acc - baseline[calibrator]) / lost * 100 if names and lost > 0 else float("nan")
            stages = [f"statistics {result.statistics_seconds:.1f}"]
            stages += [f"{r.name} {r.seconds:.1f}" for r in result.transforms]
            stages += [f"{r.name} {r.seconds:.1f}" for r in result.refinements.get(calibrator, [])]
            rows.append([f"INT8 {label}", calibrator, acc, acc - fp32_acc,
                         "-" if recovered != recovered else f"{recovered:.0f}%", "; ".join(stages), f"{total:.1f}"])
            print(f"{label:40s} {calibrator:10s} {acc:6.2f} ({acc - fp32_acc:+.2f}) {stages} total {total:.1f}s",
                  file=sys.stderr, flush=True)
            if names and (calibrator not in best or acc > best[calibrator][1]):
                best[calibrator] = (label, acc, recovered)
    section = machine_header(
        "No-training PTQ algorithms on the depthwise PTQ-fails net (issue 19) — `benchmarks/bench_ptq_algorithms.py`",
        {"calibration": "fmnist:calib 1,024 images", "eval": f"fmnist test {len(tx)} images",
         "config": "BN folded, per-tensor INT8 weights, per-tensor INT8 activations",
         "algorithm params": json.dumps(algorithm_params) if algorithm_params else "defaults"})
    section += "\n" + markdown_table(
        ["precision / algorithms", "calibrator", "top-1 %", "delta vs FP32", "loss recovered", "seconds per stage",
         "total s"], rows)
    verdicts = []
    for calibrator, (label, acc, recovered) in best.items():
        lost = fp32_acc - baseline.get(calibrator, float("nan"))
        verdicts.append(f"{calibrator}: plain PTQ loses {lost:.2f} points; best set {label}: {acc:.2f} "
                        f"({recovered:.0f}% of the loss recovered; target >= 80%: "
                        f"{'met' if recovered >= 80 else 'NOT met'})" if lost > 0 else
                        f"{calibrator}: plain PTQ loses nothing ({lost:+.2f}); best set {label}: {acc:.2f}")
    section += "\n" + "\n".join(f"- {v}" for v in verdicts) + "\n"
    emit(section, args.append)


if __name__ == "__main__":
    main()
