"""``quantlab demo``: the whole workflow on the built-in Fashion-MNIST model, then the dashboard."""
from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    from quantlab.cli.ui import add_server_args

    p = sub.add_parser("demo", help="calibrate, compare FP32/FP16/INT8, export Q/DQ ONNX on Fashion-MNIST; open the dashboard")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--no-ui", action="store_true", help="do not start the dashboard afterwards")
    p.add_argument("--eval-samples", type=int, default=None, help="Fashion-MNIST test images to score (default 2000)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration images (default 512)")
    add_server_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from quantlab.cli.common import print_table
    from quantlab.store import RunStore
    from quantlab.ui.jobs import create_job_run
    from quantlab.ui.pipeline import run_job
    from quantlab.ui.spec import demo_spec, validate
    from quantlab.ui.summaries import best_int8, results_frame

    if any(n is not None and n < 1 for n in (args.eval_samples, args.calib_samples)):
        raise ValueError("--eval-samples and --calib-samples must be >= 1")
    if not args.no_ui:
        from quantlab.cli.ui import check_host

        check_host(args.host, args.allow_remote_code)  # before the demo's work, not after
    store = RunStore(args.store)
    spec = validate(demo_spec(args.out, eval_samples=args.eval_samples, calib_samples=args.calib_samples))
    run_id = create_job_run(store, spec)
    print(f"demo: {spec.model} · calibration {spec.calib_data} · eval {spec.eval_data}", flush=True)
    bar = tqdm(total=100, desc="demo", unit="%", file=sys.stderr, disable=None, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
    state = {"done": 0}

    def progress(stage: str, fraction: float) -> None:
        bar.set_description_str(stage[:48])
        target = int(fraction * 100)
        if target > state["done"]:
            bar.update(target - state["done"])
            state["done"] = target

    try:
        outcome = run_job(store, run_id, spec, progress=progress)
    finally:
        bar.close()
    results = store.results(run_id)
    frame = results_frame(results, "top1")
    print_table(
        [[row.label, f"{row.value:.2f}", "-" if row.delta != row.delta or row.delta is None else f"{row.delta:+.2f}",
          "-" if row.seconds != row.seconds or row.seconds is None else f"{row.seconds:.1f}"] for row in frame.itertuples()],
        ["configuration", "top1 %", "Δ vs FP32", "eval s"],
    )
    best = best_int8(results, "top1")
    if best:
        print(f"best INT8: {best['label']} ({best['delta']:+.2f} points vs FP32)")
    print(f"run {run_id} recorded in {store.path}")
    print(f"run folder: {outcome['run_dir']}")
    for what, path in outcome["outputs"].items():
        print(f"  {what}: {path}")
    for note in outcome["skipped"]:
        print(f"  skipped: {note}")
    if args.no_ui:
        print(f"open the dashboard with: quantlab ui --store {store.path}")
        return 0
    from quantlab.cli.ui import serve

    return serve(str(store.path), args.port, args.host, allow_remote_code=args.allow_remote_code)
