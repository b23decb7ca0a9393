"""Evaluation cost: quantlab's one-call compare vs the same evaluations one by one with the peers.

All on the Fashion-MNIST demo CNN, the same calibration batches and the same
eval batches (``fmnist:test[:N]``), top-1:

* quantlab: ``quantlab.evaluation.compare`` with FP32 + FP16 + INT8 x 4
  calibrators (one statistics pass), per-layer SQNR off (``layer_batches=0``,
  the peers do not compute it) and on (its default, 2 batches).
* Model Optimizer, one by one: FP32 and FP16 evaluated in plain PyTorch; then
  for each of max, entropy, percentile and mse a fresh copy, ``mtq.quantize``
  (max) or histogram statistics + ``load_calib_amax(method)``, and an evaluation
  of the fake-quantized model (what four separate runs of its PTQ flow cost).
* ONNX Runtime, one by one: FP32 ONNX evaluated, then ``quantize_static`` with
  MinMax, Entropy and Percentile (it has no MSE) and an evaluation of each INT8
  model on the CPU (ORT's CPU provider has no FP16 path to time).

Examples:
    .venv/bin/python benchmarks/bench_compare.py --eval-samples 2000
    python benchmarks/bench_compare.py --device cuda --tools quantlab,modelopt
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common as C  # noqa: E402

PERCENTILE = 99.99


def _data(args: argparse.Namespace):
    from quantlab.data.fmnist import load_fmnist

    calib_x, calib_y = load_fmnist("calib")
    calib_x, calib_y = calib_x[: args.calib_samples], calib_y[: args.calib_samples]
    test_x, test_y = load_fmnist(f"test[:{args.eval_samples}]")
    bs = args.batch_size
    calib = [(calib_x[i:i + bs], calib_y[i:i + bs]) for i in range(0, len(calib_x), bs)]
    evals = [(test_x[i:i + bs], test_y[i:i + bs]) for i in range(0, len(test_x), bs)]
    return calib, evals


def _top1(model, evals, device, dtype=torch.float32) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in evals:
            logits = model(x.to(device, dtype))
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += len(y)
    return 100.0 * correct / total


def run_quantlab(args, model, calib, evals, device, layer_batches: int) -> Dict[str, Any]:
    from quantlab.evaluation.compare import compare

    seconds, result = C.timed(lambda: compare(
        model.to(device), calib, evals, metric="top1", calibrators="all", precisions="fp32,fp16,int8",
        layer_batches=layer_batches), device)
    values = {f"{r.precision}/{r.calibrator}" if r.calibrator else r.precision: r.value for r in result.primary_rows()}
    return {"seconds": seconds, "values": values}


def run_modelopt(args, model, calib, evals, device) -> Dict[str, Any]:
    with C.quiet_warnings():
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization import extensions
        from modelopt.torch.quantization.calib import HistogramCalibrator
        from modelopt.torch.quantization.model_calib import enable_stats_collection
        from modelopt.torch.quantization.nn import TensorQuantizer
    if device.type == "cuda" and not args.modelopt_cuda_ext:
        extensions.get_cuda_ext.extension = None  # PyTorch fake-quant fallback, no JIT build

    def loop(m):
        with torch.no_grad():
            for x, _ in calib:
                m(x.to(device))

    values: Dict[str, float] = {}
    start = time.perf_counter()
    model = model.to(device)
    values["fp32"] = _top1(model, evals, device)
    values["fp16"] = _top1(copy.deepcopy(model).half(), evals, device, torch.float16)
    with C.quiet_warnings():
        q = copy.deepcopy(model)
        mtq.quantize(q, copy.deepcopy(mtq.INT8_DEFAULT_CFG), loop)
        values["int8/max"] = _top1(q, evals, device)
        for method in ("entropy", "percentile", "mse"):
            cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
            for entry in cfg["quant_cfg"]:
                if entry.get("quantizer_name") == "*input_quantizer" and "cfg" in entry:
                    entry["cfg"] = dict(entry["cfg"], calibrator="histogram")
            cfg["algorithm"] = None
            q = copy.deepcopy(model)
            mtq.quantize(q, cfg, None)
            quantizers = [m for m in q.modules() if isinstance(m, TensorQuantizer) and not m._disabled]
            enable_stats_collection(q)
            q.eval()
            loop(q)
            for tq in quantizers:
                cal = getattr(tq, "_calibrator", None)
                if isinstance(cal, HistogramCalibrator):
                    tq.load_calib_amax(method, **({"percentile": PERCENTILE} if method == "percentile" else {}))
                elif cal is not None:
                    tq.load_calib_amax()
                tq.enable_quant()
                tq.disable_calib()
            values[f"int8/{method}"] = _top1(q, evals, device)
    C.sync(device)
    return {"seconds": time.perf_counter() - start, "values": values}


def run_ort(args, model, calib, evals) -> Dict[str, Any]:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from _models import export_onnx

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib)

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {"input": batch[0].numpy()}

    def top1(path: str) -> float:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        correct = total = 0
        for x, y in evals:
            logits = sess.run(None, {"input": x.numpy()})[0]
            correct += int((np.argmax(logits, 1) == y.numpy()).sum())
            total += len(y)
        return 100.0 * correct / total

    values: Dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, C.quiet_warnings():
        fp32 = os.path.join(tmp, "fp32.onnx")
        export_onnx(model.cpu().eval(), calib[0][0][:1], ["input"], fp32)
        values["fp32"] = top1(fp32)
        for name, method, extra in (("max", CalibrationMethod.MinMax, {}),
                                    ("entropy", CalibrationMethod.Entropy, {"CalibNumBins": args.ort_bins}),
                                    ("percentile", CalibrationMethod.Percentile, {"CalibNumBins": args.ort_bins, "CalibPercentile": PERCENTILE})):
            path = os.path.join(tmp, f"{name}.onnx")
            quantize_static(fp32, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                            extra_options={"ActivationSymmetric": True, **extra})
            values[f"int8/{name}"] = top1(path)
    return {"seconds": time.perf_counter() - start, "values": values}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--tools", default="quantlab,modelopt,ort")
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ort-bins", type=int, default=2048)
    parser.add_argument("--modelopt-cuda-ext", action="store_true")
    args = parser.parse_args(argv)
    device = C.setup_torch(args)
    from quantlab.models.fmnist import pretrained_fmnist_cnn

    base = pretrained_fmnist_cnn().eval()
    calib, evals = _data(args)
    tools = [t.strip() for t in args.tools.split(",")]
    runs: Dict[str, Dict[str, Any]] = {}
    if "quantlab" in tools:
        runs["quantlab compare (FP32+FP16+INT8 x4, no per-layer SQNR)"] = run_quantlab(args, copy.deepcopy(base), calib, evals, device, 0)
        runs["quantlab compare (same + per-layer SQNR, 2 batches)"] = run_quantlab(args, copy.deepcopy(base), calib, evals, device, 2)
    if "modelopt" in tools:
        runs["Model Optimizer one by one (FP32, FP16, INT8 x4)"] = run_modelopt(args, copy.deepcopy(base), calib, evals, device)
    if "ort" in tools:
        runs["ONNX Runtime one by one (FP32, INT8 x3; CPU)"] = run_ort(args, copy.deepcopy(base), calib, evals)
    keys = ["fp32", "fp16", "int8/max", "int8/percentile", "int8/entropy", "int8/mse"]
    rows = [[name, r["seconds"], *[r["values"].get(k) for k in keys]] for name, r in runs.items()]
    section = C.machine_header("Evaluation cost: one compare vs the peers one by one (Fashion-MNIST CNN)", {
        "device": str(device), "calibration samples": args.calib_samples, "eval samples": args.eval_samples,
        "batch size": args.batch_size})
    if device.type == "cpu" or "ort" in tools:
        section += "\n" + C.CPU_NOISE_NOTE + "\n"
    section += "\n" + C.markdown_table(["workflow", "wall s", *[f"top-1 {k}" for k in keys]], rows)
    C.emit(section, args.append)


if __name__ == "__main__":
    main()
