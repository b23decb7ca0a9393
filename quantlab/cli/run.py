"""``quantlab run``: run an ONNX model (ONNX Runtime) or a TensorRT plan over a dataset."""
from __future__ import annotations

import argparse

from quantlab.cli.common import print_table, progress_bar


def register(sub) -> None:
    p = sub.add_parser("run", help="accuracy and latency of an ONNX model (ONNX Runtime, real INT8 kernels on the CPU) or a TensorRT plan")
    p.add_argument("model", help=".onnx (ONNX Runtime) or .plan/.engine (TensorRT)")
    p.add_argument("--data", required=True, help="data spec, e.g. fmnist:test or fmnist:test[:1000]")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default=None, help="default: by file suffix")
    p.add_argument("--latency", action="store_true", help="also measure the median latency of one batch")
    p.add_argument("--store", help="record results in this run store (default: $QUANTLAB_STORE if set)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.cli._progress import stage
    from quantlab.jobs.recorder import optional_store
    from quantlab.jobs.run import run_model

    stage(f"loading {args.model} and {args.data}")
    outcome = run_model(args.model, args.data, batch_size=args.batch_size, max_batches=args.max_batches,
                        threads=args.threads, backend=args.backend, latency=args.latency,
                        store=optional_store(args.store),
                        progress_bar=lambda total, backend: progress_bar(total, f"running on {backend}"))
    result, latency = outcome.result, outcome.latency
    rows = [["samples", result.num_samples], ["top-1 (%)", f"{result.top1:.2f}" if result.top1 is not None else "n/a (no labels)"],
            ["wall time (s)", f"{result.seconds:.2f}"]]
    if latency is not None:
        rows.append([f"median latency, batch {latency.batch_size} (ms)", f"{latency.median_ms:.2f}"])
    if outcome.backend == "onnxruntime":
        rows.append(["ORT integer kernels", ", ".join(f"{k} x{v}" for k, v in sorted(outcome.kernels.items())) or "none (runs in float)"])
        report = outcome.int8_form
        if not outcome.qdq_fusion:
            shown = "TensorRT form: its Q/DQ computed with float kernels (ONNX Runtime's QDQ fusion off)"
        else:
            shown = report.describe() if report is not None else "not checked"
        rows.append(["ORT INT8 form", shown])
    print_table(rows, [str(args.model), outcome.backend])
    if outcome.run_id:
        print(f"recorded run {outcome.run_id}")
    return 0
