"""``quantlab run``: run an ONNX model (ONNX Runtime) or a TensorRT plan over a dataset."""
from __future__ import annotations

import argparse
import os

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
    from quantlab.data import load_data
    from quantlab.runtimes.factory import open_runner

    data = load_data(args.data, batch_size=args.batch_size)
    total = len(data) if hasattr(data, "__len__") else None
    if args.max_batches is not None and total is not None:
        total = min(total, args.max_batches)
    with open_runner(args.model, backend=args.backend, threads=args.threads) as runner:
        with progress_bar(total, runner.backend) as progress:
            result = runner.run_dataset(data, max_batches=args.max_batches, progress=progress)
        latency = None
        if args.latency:
            from quantlab.batching import split_batch

            inputs, _ = split_batch(next(iter(data)))
            latency = runner.measure_latency(inputs)
    rows = [["samples", result.num_samples], ["top-1 (%)", f"{result.top1:.2f}" if result.top1 is not None else "n/a (no labels)"],
            ["wall time (s)", f"{result.seconds:.2f}"]]
    if latency is not None:
        rows.append([f"median latency, batch {latency.batch_size} (ms)", f"{latency.median_ms:.2f}"])
    kernels = {}
    form = None
    if runner.backend == "onnxruntime":
        from quantlab.runtimes.onnxruntime.runner import quantized_kernels

        kernels = quantized_kernels(args.model, threads=args.threads)
        rows.append(["ORT integer kernels", ", ".join(f"{k} x{v}" for k, v in sorted(kernels.items())) or "none (runs in float)"])
        report = runner.int8_form
        form = report.form if report is not None else None
        if not runner.qdq_fusion:
            shown = "TensorRT form: its Q/DQ computed with float kernels (ONNX Runtime's QDQ fusion off)"
        else:
            shown = report.describe() if report is not None else "not checked"
        rows.append(["ORT INT8 form", shown])
    print_table(rows, [str(args.model), runner.backend])
    _record(args, result, latency, form)
    return 0


def _record(args, result, latency, form=None) -> None:
    path = args.store or os.environ.get("QUANTLAB_STORE")
    if not path or result.top1 is None:
        return
    from quantlab.export.graph import load_onnx
    from quantlab.export.mapping import metadata
    from quantlab.store import RunStore

    precision = "fp32"
    if str(args.model).endswith(".onnx"):
        fmt = metadata(load_onnx(args.model, check=False)).get("quantlab.format", "")
        precision = "int8" if fmt.startswith("qdq") else ("fp16" if fmt == "fp16" else "fp32")
    store = RunStore(path)
    config = {"backend": args.backend, "threads": args.threads, "ort_int8": form}
    run_id = store.create_run("export", model=str(args.model), eval_data=args.data, config=config)
    store.add_results(run_id, [{"precision": precision, "calibrator": None, "source": "ptq", "metric": "top1",
                                "value": result.top1, "delta": None, "seconds": result.seconds}])
    if latency is not None:
        store.add_results(run_id, [{"precision": precision, "calibrator": None, "source": "ptq", "metric": f"latency_ms_b{latency.batch_size}",
                                    "value": latency.median_ms, "delta": None, "seconds": None}])
    store.set_status(run_id, "done", progress=1.0)
    print(f"recorded run {run_id}")
