"""``quantlab export``: INT8 Q/DQ, FP16 or FP32 ONNX of a model (INT8 from a scales file)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from quantlab.cli.common import add_model_args, example_batch, input_paths, load_cli_model, print_table


def register(sub) -> None:
    p = sub.add_parser("export", help="export INT8 (Q/DQ), FP16 or FP32 ONNX for TensorRT or ONNX Runtime")
    add_model_args(p)
    p.add_argument("--precision", choices=("int8", "fp16", "fp32"), default="int8", help="default int8")
    p.add_argument("--scales", help="scales file from `quantlab calibrate` (required for int8)")
    p.add_argument("--out", required=True, help="output .onnx file (a <out>.json sidecar records tensor names)")
    p.add_argument("--target", choices=("tensorrt", "ort-cpu"), default="tensorrt",
                   help="int8 form: tensorrt (INT8, zero point 0; default) or ort-cpu (UINT8 activations, ONNX Runtime integer kernels)")
    p.add_argument("--ort-other-convs", choices=("im2col", "float", "conv-integer"), default="im2col",
                   help="ort-cpu: how convs without an output quantizer (residual branches) run (default im2col: integer GEMM)")
    p.add_argument("--ort-int8", choices=("auto", "u8s8", "u8u8", "qdq-float"), default="auto",
                   help="ort-cpu: integer form (default auto: u8s8 where this CPU's ONNX Runtime computes it exactly, "
                        "else u8u8, else qdq-float; force one for another machine)")
    p.add_argument("--ort-reduce-range", action="store_true",
                   help="ort-cpu: 7-bit weights (u8s8 exact on any CPU, but not the weights TensorRT uses; recorded in the file)")
    p.add_argument("--input-shape", help="one sample's shape without the batch, e.g. 1,28,28 (or use --data)")
    p.add_argument("--data", help="take the example batch from this data spec, e.g. fmnist:calib")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript", help="torch.onnx exporter (default torchscript)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; >= 13; dynamo uses >= 18)")
    p.add_argument("--io-dtype", choices=("fp32", "fp16"), default="fp32", help="fp16 export: graph input/output type (default fp32)")
    p.add_argument("--static-batch", action="store_true", help="fixed batch dimension instead of a symbolic one")
    p.add_argument("--no-placement", action="store_true", help="skip the TensorRT placement pass (residual/Concat/Pad)")
    p.add_argument("--no-check", action="store_true", help="do not run `quantlab check` on the INT8 result")
    p.add_argument("--store", help="record the export in this run store (default: $QUANTLAB_STORE if set, else not recorded)")
    p.set_defaults(func=run)


def example_inputs(args: argparse.Namespace):
    """The example batch for tracing: from --data or a random tensor of --input-shape."""
    import torch

    if args.data:
        return example_batch(args.data)
    if args.input_shape:
        import re

        try:
            shape = tuple(int(d) for d in re.split(r"[x,]", args.input_shape.strip()))
        except ValueError:
            raise ValueError(f"--input-shape {args.input_shape!r} must be comma-separated integers, e.g. 1,28,28") from None
        if not shape or any(d <= 0 for d in shape):
            raise ValueError(f"--input-shape {args.input_shape!r} must hold positive integers")
        generator = torch.Generator().manual_seed(0)
        return torch.randn((2,) + shape, generator=generator)
    raise ValueError("give --input-shape (e.g. 1,28,28) or --data (e.g. fmnist:calib) so the model can be traced")


def run(args: argparse.Namespace) -> int:
    if args.precision == "int8" and not args.scales:
        raise ValueError("--precision int8 needs --scales (a scales file from `quantlab calibrate`)")
    if args.precision != "int8" and args.target != "tensorrt":
        raise ValueError("--target applies to --precision int8 only")
    if args.target != "ort-cpu" and (args.ort_int8 != "auto" or args.ort_reduce_range):
        raise ValueError("--ort-int8 / --ort-reduce-range apply to --target ort-cpu only")
    from quantlab.outputs import EXPORT_SIDECAR, ONNX_FILE, check_output_file
    from quantlab.store.lock import RunLock

    # Before any work: never over an input (--scales, --model, ...), a folder, or a file that is not an ONNX model.
    inputs = input_paths(args, "model", "weights", "scales", "data")
    out = check_output_file(args.out, label="--out", inputs=inputs, replace=ONNX_FILE)
    check_output_file(f"{out}.json", label="--out's sidecar", inputs=inputs, replace=EXPORT_SIDECAR)
    lock = RunLock(out, "quantlab export")  # a second export to the same --out is refused, not interleaved
    try:
        return _export(args, out)
    finally:
        lock.release()


def _export(args: argparse.Namespace, out: Path) -> int:
    from quantlab.model_source import is_torchscript_spec
    from quantlab.scales import Scales

    scales = Scales.load(args.scales) if args.precision == "int8" else None  # a bad file fails before the model loads

    # The model first: an example module may register the data specs it brings (fortunes:...).
    # (A TorchScript file needs the example batch to be converted: then it comes first.)
    early = example_inputs(args) if is_torchscript_spec(args.model) else None
    model = load_cli_model(args, None, example=early)
    inputs = early if early is not None else example_inputs(args)
    common = dict(exporter=args.exporter, opset=args.opset, dynamic_batch=not args.static_batch)
    store, run_id = _start_record(args)
    try:
        if args.precision == "int8":
            import quantlab as ql
            from quantlab.export.qdq import export_int8

            ql.load_scales(model, scales)  # strict: names every missing or extra layer
            result = export_int8(model, out, inputs, target=args.target, placement=not args.no_placement,
                                 ort_other_convs=args.ort_other_convs, ort_int8=args.ort_int8,
                                 ort_reduce_range=args.ort_reduce_range, **common)
        else:
            from quantlab.export.float import export_float

            result = export_float(model, out, inputs, precision=args.precision, io_dtype=args.io_dtype, **common)
    except BaseException as exc:  # Ctrl-C/SIGTERM included: the run is recorded interrupted, not left running
        if store is not None:
            from quantlab.interrupts import outcome_message, outcome_status

            store.set_status(run_id, outcome_status(exc), error=outcome_message(exc)[:500])
        raise
    print(f"wrote {result.path} ({result.precision}{'/' + result.target if result.target else ''}, opset {result.opset}, "
          f"{result.exporter} exporter, {result.seconds:.1f} s); tensor map: {result.sidecar}")
    if result.folded_batchnorm:
        print(f"folded {len(result.folded_batchnorm)} BatchNormalization node(s) into their convs")
    if result.placement:
        placed = result.placement
        print(f"placement: {len(placed['residual_quantized'])} residual Add(s) quantized, "
              f"{len(placed['concat_unified'])} Concat scale(s) unified, {len(placed['pad_moved'])} Pad(s) fused")
        for item in placed["residual_left_float"]:
            print(f"  residual left in float (no calibrated scale): {item}")
    if result.ort_cpu:
        print("ort-cpu kernels: " + ", ".join(f"{k} {v}" for k, v in result.ort_cpu.items() if v))
    if result.ort_int8:
        _print_form(result.ort_int8)
    if result.unmapped:
        print(f"note: {len(result.unmapped)} quantizer(s) have no node in the graph (layer never called): {', '.join(result.unmapped[:5])}")
    status = 0
    if result.precision == "int8" and result.target == "tensorrt" and not args.no_check:
        from quantlab.export.check import check_model

        report = check_model(result.path)
        print(f"check: {len(report.errors)} error(s), {len(report.warnings)} warning(s); "
              f"{report.num_weighted_quantized}/{report.num_weighted} weighted ops quantized")
        if report.findings:
            print_table([[f.severity, f.rule, f.node, f.message] for f in report.findings[:20]], ["severity", "rule", "node", "message"])
        status = 1 if report.errors else 0
    if store is not None:
        store.add_artifact(run_id, "onnx", result.path)
        if result.sidecar:
            store.add_artifact(run_id, "report", result.sidecar)
        store.set_status(run_id, "done" if status == 0 else "failed", progress=1.0)
        print(f"recorded run {run_id}")
    return status


def _print_form(info: dict) -> None:
    bits = "" if info["weight_bits"] == 8 else f", {info['weight_bits']}-bit weights (reduce_range)"
    how = "chosen by auto" if info["requested"] == "auto" else "forced"
    print(f"ort-cpu INT8 form: {info['form']} ({how}{bits}) on {info['chosen_on']}")
    if not info["exact_here"]:
        print(f"note: {info['form']} is NOT exact on this CPU: ONNX Runtime here (`quantlab run`) will refuse this file; "
              "it is for another machine")


def _start_record(args: argparse.Namespace):
    path = args.store or os.environ.get("QUANTLAB_STORE")
    if not path:
        return None, None
    from quantlab.store import RunStore

    store = RunStore(path)
    config = {"precision": args.precision, "target": args.target if args.precision == "int8" else None,
              "scales": args.scales, "exporter": args.exporter, "opset": args.opset, "out": str(args.out)}
    if args.precision == "int8" and args.target == "ort-cpu":
        from quantlab.runtimes.onnxruntime.forms import resolve_form

        # The same (memoized) choice export_int8 makes next, so the run records which kernels the file uses.
        choice = resolve_form(args.ort_int8, reduce_range=args.ort_reduce_range)
        config.update(ort_int8=choice.form, ort_int8_requested=args.ort_int8, ort_weight_bits=choice.weight_bits)
    run_id = store.create_run("export", model=args.model, data=args.data, config=config, run_dir=str(Path(args.out).parent))
    return store, run_id
