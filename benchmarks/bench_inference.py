"""Inference speed of the encoder: FP32 vs FP16 vs INT8, PyTorch (CPU or GPU) and ONNX Runtime (CPU).

PyTorch path (``--device cpu|cuda``):

* FP32: the model as built.
* FP16: ``model.half()`` (GPU only by default; CPU FP16 is not a deployment path).
* INT8: every ``nn.Linear`` replaced by :class:`Int8Linear`, which quantizes its
  input per tensor with the scale quantlab calibrated (entropy by default),
  runs a real INT8 GEMM through ``torch._int_mm`` against per-channel INT8
  weights (narrow range, quantlab's weight scales), and rescales the INT32
  accumulator in FP32. Everything else runs in FP16 on the GPU (FP32 on the CPU),
  as TensorRT's mixed INT8/FP16 engines do.
* ``--compile``: the FP16 and INT8 models again through ``torch.compile`` (which
  fuses the quantize/rescale element-wise work around the GEMMs).

ONNX Runtime path (CPU, ``--ort``): FP32 ONNX export vs ORT INT8 from the same
calibration batches: ``quantize_static`` Q/DQ with int8 activations (symmetric,
TensorRT style) and with uint8 activations, and ``quantize_dynamic``.

The error of each variant vs FP32 (relative L2 of the last hidden state) is
printed beside its latency so a fast-but-wrong path is visible. TensorRT numbers
cannot be taken here (TensorRT is not installable); none are estimated.

Examples:
    .venv/bin/python benchmarks/bench_inference.py --model minilm --batch-sizes 1,16 --ort
    python benchmarks/bench_inference.py --device cuda --model bert-base --batch-sizes 1,128 --compile
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common as C  # noqa: E402
from _models import SEQ_LEN, call, export_onnx, make_workload  # noqa: E402


class Int8Linear(nn.Module):
    """``nn.Linear`` with a real INT8 GEMM (``torch._int_mm``).

    Args:
        linear: The FP32 layer (its weight is quantized per output channel).
        input_amax: Calibrated ``|x|`` range of the layer's input (per tensor).
        weight_amax: Per-output-channel weight ranges (``[out_features]``).
        out_dtype: Dtype of the output (FP16 on the GPU).
    """

    def __init__(self, linear: nn.Linear, input_amax: float, weight_amax: torch.Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        w_scale = (weight_amax.float().clamp_min(2**-30) / 127.0).to(w.device)
        wq = torch.clamp(torch.round(w / w_scale[:, None]), -127, 127).to(torch.int8)
        x_scale = max(float(input_amax), 2**-30) / 127.0
        self.register_buffer("weight_int8", wq.contiguous())  # [out, in]; passed transposed (column-major B)
        self.register_buffer("rescale", (w_scale * x_scale).float())  # int32 accumulator -> real units
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(out_dtype))
        self.inv_x_scale = 1.0 / x_scale
        self.out_dtype = out_dtype
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= 16:  # cuBLASLt's int8 GEMM needs more than 16 rows: pad
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, 17 - x2.shape[0]))
        xq = torch.clamp(torch.round(x2.float() * self.inv_x_scale), -128, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.weight_int8.t())
        y = (acc.float() * self.rescale).to(self.out_dtype)[: shape[:-1].numel()]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def calibrated_ranges(model: nn.Module, batches, calibrator: str) -> Dict[str, Dict[str, Any]]:
    """quantlab's input amax and per-channel weight amax of every Linear, by module name."""
    import quantlab

    probe = quantlab.quantize(model, quantlab.int8_config(calibrator=calibrator),
                              forward_loop=lambda m: [call(m, b) for b in batches])
    out: Dict[str, Dict[str, Any]] = {}
    for entry in quantlab.current_scales(probe).entries:
        out.setdefault(entry.module, {})[entry.role] = entry.amax
    quantlab.remove_quantizers(model)
    return out


def int8_model(model: nn.Module, ranges: Dict[str, Dict[str, Any]], out_dtype: torch.dtype) -> nn.Module:
    """Replaces every calibrated nn.Linear (in place) by an :class:`Int8Linear`."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full in ranges and "input" in ranges[full]:
                r = ranges[full]
                setattr(module, child_name, Int8Linear(child, r["input"], torch.tensor(r["weight"]), out_dtype))
    return model


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def torch_rows(args: argparse.Namespace, device: torch.device) -> List[List[Any]]:
    import copy

    rows: List[List[Any]] = []
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    calib = make_workload(args.model, args.calib_samples, min(32, args.calib_samples))
    base = calib.build().to(device)
    ranges = calibrated_ranges(copy.deepcopy(base), list(calib.batches(device)), args.calibrator)
    half = device.type == "cuda" and not args.no_fp16
    low = torch.float16 if half else torch.float32
    variants: Dict[str, nn.Module] = {"PyTorch FP32": base}
    if half:
        variants["PyTorch FP16"] = copy.deepcopy(base).half()
    variants[f"PyTorch INT8 (_int_mm, {'FP16' if half else 'FP32'} elsewhere)"] = int8_model(
        copy.deepcopy(base).to(low), ranges, low)
    n_int8 = sum(isinstance(m, Int8Linear) for m in list(variants.values())[-1].modules())
    if args.compile:
        for name in list(variants):
            if name != "PyTorch FP32":
                variants[name + ", torch.compile"] = torch.compile(variants[name], mode=args.compile_mode)
    for bs in batch_sizes:
        batch = next(iter(make_workload(args.model, bs, bs).batches(device)))
        with torch.no_grad():
            ref = call(base, batch)
            for name, model in variants.items():
                def step(m=model) -> torch.Tensor:
                    with torch.no_grad():
                        return call(m, batch)
                try:
                    out = step()
                    for _ in range(2):  # compile / autotune / allocator warm-up
                        step()
                    seconds = C.median_time(step, repeats=args.repeats, warmup=1, device=device)
                    err = rel_error(out, ref)
                    rows.append([name, bs, seconds * 1e3, bs / seconds, err, f"{n_int8} Linear layers in INT8" if "INT8" in name else ""])
                except Exception as exc:  # keep the other variants' numbers
                    rows.append([name, bs, None, None, None, f"failed: {type(exc).__name__}: {str(exc)[:160]}"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ort_rows(args: argparse.Namespace) -> List[List[Any]]:
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    rows: List[List[Any]] = []
    calib = make_workload(args.model, args.calib_samples, min(32, args.calib_samples))
    model = calib.build()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = calib.numpy_batches()

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        with C.quiet_warnings():
            export_onnx(model, calib.example(), calib.input_names, fp32)
        paths = {"ORT FP32": fp32}
        for label, act in (("ORT INT8 QDQ, int8 activations (TensorRT style)", QuantType.QInt8),
                           ("ORT INT8 QDQ, uint8 activations", QuantType.QUInt8)):
            path = os.path.join(tmp, f"{act.name}.onnx")
            quantize_static(fp32, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=act, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": act == QuantType.QInt8})
            paths[label] = path
        dyn = os.path.join(tmp, "dynamic.onnx")
        quantize_dynamic(fp32, dyn, weight_type=QuantType.QInt8, per_channel=True)
        paths["ORT INT8 dynamic (MatMulInteger)"] = dyn
        opts = ort.SessionOptions()
        if args.threads:
            opts.intra_op_num_threads = args.threads
        sessions = {k: ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
        for bs in [int(b) for b in args.ort_batch_sizes.split(",")]:
            feed = next(make_workload(args.model, bs, bs).numpy_batches())
            ref = sessions["ORT FP32"].run(None, feed)[0]
            for name, sess in sessions.items():
                out = sess.run(None, feed)[0]
                seconds = C.median_time(lambda s=sess: s.run(None, feed), repeats=args.repeats, warmup=1)
                err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                rows.append([name, bs, seconds * 1e3, bs / seconds, err, f"{sess.get_session_options().intra_op_num_threads or os.cpu_count()} threads"])
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--model", default="minilm", choices=["minilm", "bert-base"])
    parser.add_argument("--batch-sizes", default="1,128", help="PyTorch batch sizes (sequences of 128 tokens)")
    parser.add_argument("--ort-batch-sizes", default="1,16", help="ONNX Runtime batch sizes (CPU)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calibrator", default="entropy")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd FP16 and INT8")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    parser.add_argument("--no-fp16", action="store_true")
    parser.add_argument("--ort", action="store_true", help="also run the ONNX Runtime CPU comparison")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch path")
    args = parser.parse_args(argv)
    device = C.setup_torch(args)
    headers = ["variant", "batch", "median ms", "sequences/s", "rel. L2 error vs FP32", "notes"]
    sections = [C.machine_header(f"Inference: {args.model} encoder, sequence {SEQ_LEN}, FP32 vs FP16 vs INT8", {
        "device": str(device), "repeats": args.repeats, "INT8 calibrator": args.calibrator})]
    if device.type == "cpu" or args.ort:
        sections.append(C.CPU_NOISE_NOTE + "\n")
    if not args.no_torch:
        sections.append(f"### PyTorch on {device}\n\n" + C.markdown_table(headers, torch_rows(args, device)))
    if args.ort:
        sections.append("### ONNX Runtime on the CPU\n\n" + C.markdown_table(headers, ort_rows(args)))
    sections.append(C.TENSORRT_NOTE + "\n")
    C.emit("\n".join(sections), args.append)


if __name__ == "__main__":
    main()
