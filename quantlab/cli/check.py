"""``quantlab check``: TensorRT Q/DQ placement and format rules, per node, for any ONNX model."""
from __future__ import annotations

import argparse
import json

from quantlab.cli.common import print_table


def register(sub) -> None:
    p = sub.add_parser("check", help="report Q/DQ placement problems TensorRT would reject or run slowly, or check a calibration cache (exit 1 on errors)")
    p.add_argument("model", help="an ONNX file (quantlab's or any other tool's) or a TensorRT calibration cache")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument("--sparsity", action="store_true",
                   help="also report per layer whether the (INT8) weight is 2:4 along the input axis TensorRT's sparse kernels need, "
                        "and whether the layer is eligible; with --strict, an eligible layer that breaks the pattern exits 1")
    p.add_argument("--table", action="store_true",
                   help="also list every Q/DQ node: what it quantizes (activation or weight, which layer), "
                        "the nodes it feeds, its scale (per tensor or per channel) and zero point")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.export.check import check_model
    from quantlab.export.graph import load_onnx
    from quantlab.export.mapping import metadata

    if _is_calibration_cache(args.model):
        return _check_cache(args)
    report = check_model(args.model)
    form_line, form_info = _ort_form(args.model)
    sparsity = None
    if args.sparsity:
        from quantlab.sparsity.check import check_onnx_sparsity

        sparsity = check_onnx_sparsity(args.model)
    table = None
    if args.table:
        from quantlab.export.qdq_table import qdq_table

        table = qdq_table(args.model)
    if args.json:
        data = {**report.to_dict(), "ort_int8": form_info}
        if table is not None:
            data["qdq"] = [row.to_dict() for row in table]
        if sparsity is not None:
            data["sparsity"] = sparsity.to_dict()
        print(json.dumps(data, indent=1))
    else:
        print(f"{args.model}: opset {report.opset}, {report.num_nodes} nodes, {report.num_qdq} Q/DQ, "
              f"{report.num_weighted_quantized}/{report.num_weighted} weighted ops quantized")
        if report.findings:
            print_table([[f.severity, f.rule, f.node, f.op_type, f.message] for f in report.findings],
                        ["severity", "rule", "node", "op", "message"])
        print(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")
        if form_line:
            print(f"ONNX Runtime INT8 form: {form_line}")
        if report.errors and metadata(load_onnx(args.model, check=False)).get("quantlab.target") == "ort-cpu":
            print("note: this is an `--target ort-cpu` export (UINT8 activations for ONNX Runtime); export with --target tensorrt for TensorRT")
        if sparsity is not None:
            print_sparsity(sparsity)
        if table is not None:
            from quantlab.export.qdq_table import HEADERS
            from quantlab.jobs.export import artifact_provenance, provenance_text

            origin = artifact_provenance(args.model)
            if origin.get("calibrator"):
                print(f"made from: {provenance_text(origin)}")
            print(f"Q/DQ nodes ({len(table)}):")
            print_table([row.cells() for row in table], HEADERS)
    if report.errors or (args.strict and report.warnings):
        return 1
    if sparsity is not None and args.strict and sparsity.eligible_not_compliant:
        return 1
    return 0


def _is_calibration_cache(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"TRT-"
    except OSError:
        return False  # check_model reports the missing or unreadable file


def _check_cache(args: argparse.Namespace) -> int:
    """A calibration cache passes when every line parses and every scale is finite, > 0 and normal."""
    from quantlab.export.cache import read_calibration_cache
    from quantlab.export.errors import CacheFormatError

    try:
        cache = read_calibration_cache(args.model)
    except CacheFormatError as exc:
        if args.json:
            print(json.dumps({"source": args.model, "ok": False, "errors": [str(exc)]}, indent=1))
        else:
            print(f"{args.model}: calibration cache: 1 error(s)\n  {exc}")
        return 1
    if args.json:
        print(json.dumps({"source": args.model, "ok": True, "errors": [], "version": cache.version,
                          "algorithm": cache.algorithm, "tensors": len(cache.scales)}, indent=1))
    else:
        print(f"{args.model}: calibration cache {cache.header}, {len(cache.scales)} tensor(s), every scale finite, > 0 and normal; 0 error(s)")
        from quantlab.export.cache import cache_calibrator, header_note

        print(f"note: {header_note(cache.algorithm, cache_calibrator(args.model))}")
    return 0


def _ort_form(path):
    """(one line, dict) on the file's ONNX Runtime integer form and its exactness on this CPU.

    Informational: a form not exact here is reported, not an error of this command
    (whose exit code is about TensorRT's rules); `quantlab run` refuses such a file.
    """
    from quantlab.errors import QuantlabError
    from quantlab.export.graph import load_onnx
    from quantlab.runtimes.onnxruntime.verify import verify_model

    model = load_onnx(path, check=False)
    fusion = next((p.value for p in model.metadata_props if p.key == "quantlab.target"), None) != "tensorrt"
    try:
        found = verify_model(model, str(path), qdq_fusion=fusion)
    except QuantlabError as exc:
        return f"NOT usable on this CPU: {exc}", {"exact_here": False, "error": str(exc)}
    if found.recorded is None and not found.kernels:
        return None, None
    return found.describe(), found.to_dict()


def print_sparsity(sparsity) -> None:
    """The per-layer 2:4 table and a summary line (also used by ``quantlab export --sparsity``)."""
    from quantlab.sparsity.check import format_table

    rows, headers = format_table(sparsity)
    print_table(rows, headers)
    eligible = sum(layer.eligible for layer in sparsity.layers)
    print(f"2:4: {len(sparsity.compliant)} of {eligible} eligible layer(s) hold the pattern along the input axis "
          f"({len(sparsity.layers)} weighted layers); trtexec needs --sparsity=enable (quantlab build --sparsity --print-trtexec)")
