"""Where the host's time goes in one run_ptq call (issue 18): cProfile of a few pipeline calls after a
warm-up, the pipeline's own functions by cumulative time and everything by own time. The GPU work is
asynchronous: this is the Python/launch side, which decides the wall time once the pass is host-bound
and always after the statistics are read back (the tail nothing overlaps).

    python benchmarks/profile_run_ptq_host.py --device cuda --model resnet50 --samples 512 --calls 5
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from _models import make_workload, quantized_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    C.add_common_args(parser)
    parser.add_argument("--model", default="resnet50", help="resnet50 or bert-base")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    device = C.setup_torch(args)
    from quantlab.batching import forward_loop
    from quantlab.pipeline import run as run_pipeline

    wl = make_workload(args.model, args.samples, args.batch_size)
    model, _ = quantized_model(wl, device)
    calibrators = ["max", "percentile", "entropy", "mse"]
    for _ in range(2):  # warm-up: kernels compiled, statistics state allocated
        run_pipeline(model, forward_loop(wl.batches(device)), calibrators)
    C.sync(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.calls):
        run_pipeline(model, forward_loop(wl.batches(device)), calibrators)
        C.sync(device)
    profiler.disable()
    by_cumulative, by_own = io.StringIO(), io.StringIO()
    pstats.Stats(profiler, stream=by_cumulative).sort_stats("cumulative").print_stats(r"quantlab|calibrators", 45)
    pstats.Stats(profiler, stream=by_own).sort_stats("tottime").print_stats(40)
    text = (C.machine_header("Host time of run_ptq calls (cProfile)", {"device": str(device)})
            + f"\n### {args.model}, {args.samples} samples, batch {args.batch_size}, {args.calls} calls, four calibrators\n\n"
            + "Pipeline functions by cumulative time:\n\n```\n" + by_cumulative.getvalue() + "\n```\n\n"
            + "Everything by own time:\n\n```\n" + by_own.getvalue() + "\n```\n")
    C.emit(text, args.append)


if __name__ == "__main__":
    main()
