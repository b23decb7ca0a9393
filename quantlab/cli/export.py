"""``quantlab export``: INT8 Q/DQ, FP16 or FP32 ONNX of a model (INT8 from a scales file)."""
from __future__ import annotations

import argparse

from quantlab.cli.common import add_model_args, print_table


def register(sub) -> None:
    p = sub.add_parser("export", help="export INT8 (Q/DQ), FP16 or FP32 ONNX for TensorRT or ONNX Runtime")
    add_model_args(p)
    p.add_argument("--precision", choices=("int8", "fp16", "fp32"), default="int8", help="default int8")
    p.add_argument("--scales", help="scales file from `quantlab calibrate` (int8: this or --checkpoint)")
    p.add_argument("--checkpoint", help="quantized checkpoint model.<calibrator>.safetensors (written where --algorithms changed "
                                        "the weights): rebuilt on --model's FP32 model with the scales beside it (or --scales)")
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
    p.add_argument("--sparsity", choices=["2:4"], default=None,
                   help="the model is 2:4-pruned (e.g. --weights from `quantlab qat --sparsity 2:4`): check that every layer that "
                        "holds the pattern in PyTorch still holds it in the exported INT8 weights (exit 1 if not) and print the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.cli._progress import StageProgress
    from quantlab.jobs.export import artifact_provenance, provenance_text, run_export
    from quantlab.jobs.recorder import optional_store

    outcome = run_export(
        args.model, args.out, precision=args.precision, scales=args.scales, weights=args.weights, device=args.device,
        data=args.data, input_shape=args.input_shape, target=args.target, ort_other_convs=args.ort_other_convs,
        ort_int8=args.ort_int8, ort_reduce_range=args.ort_reduce_range,
        exporter=args.exporter, opset=args.opset, io_dtype=args.io_dtype, dynamic_batch=not args.static_batch,
        placement=not args.no_placement, check=not args.no_check, store=optional_store(args.store),
        sparsity=args.sparsity, checkpoint=args.checkpoint, progress=StageProgress(),
    )
    result = outcome.result
    print(f"wrote {result.path} ({result.precision}{'/' + result.target if result.target else ''}, opset {result.opset}, "
          f"{result.exporter} exporter, {result.seconds:.1f} s); tensor map: {result.sidecar}")
    origin = artifact_provenance(result.path)
    if origin:
        print(f"from: {provenance_text(origin)}")
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
    report = outcome.check
    if report is not None:
        print(f"check: {len(report.errors)} error(s), {len(report.warnings)} warning(s); "
              f"{report.num_weighted_quantized}/{report.num_weighted} weighted ops quantized")
        if report.findings:
            print_table([[f.severity, f.rule, f.node, f.message] for f in report.findings[:20]], ["severity", "rule", "node", "message"])
    if outcome.sparsity is not None:
        from quantlab.cli.check import print_sparsity

        print_sparsity(outcome.sparsity.report)
        if outcome.sparsity.problem:
            print(outcome.sparsity.problem)
    if outcome.run_id:
        print(f"recorded run {outcome.run_id}")
    return outcome.status


def _print_form(info: dict) -> None:
    bits = "" if info["weight_bits"] == 8 else f", {info['weight_bits']}-bit weights (reduce_range)"
    how = "chosen by auto" if info["requested"] == "auto" else "forced"
    print(f"ort-cpu INT8 form: {info['form']} ({how}{bits}) on {info['chosen_on']}")
    if not info["exact_here"]:
        print(f"note: {info['form']} is NOT exact on this CPU: ONNX Runtime here (`quantlab run`) will refuse this file; "
              "it is for another machine")
