"""Does Python's cyclic garbage collector decide run_ptq's slow calls (issue 18)? In bench_calibration the call
with the collector held off was at or below the other run_ptq columns in 13 of 14 rows, though the collections seen
inside the watched calls took 0.3-2 ms. Here the same pipeline call, interleaved with FP32 inference, as is, with the
collector held off, with the collector frozen (objects alive before the call skipped by every collection), and
right after a full collection; also FP32 with the collector held off. Prints min / median / max and the share of
calls within 3% of the fastest.

    python benchmarks/diagnose_gc.py --device cuda --model resnet50 --samples 512 --repeats 30
"""
from __future__ import annotations

import argparse
import gc
import statistics as st
import sys
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from _models import make_workload, quantized_model, run_batches  # noqa: E402

CALIBRATORS = ["max", "percentile", "entropy", "mse"]


def around(job: Callable[[], None], before: Callable[[], None], after: Callable[[], None]) -> Callable[[], None]:
    """``job`` with ``before()`` ahead of it and ``after()`` behind it, even if it raises."""
    def run() -> None:
        before()
        try:
            job()
        finally:
            after()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    C.add_common_args(parser)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--samples", default="512", help="comma list")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device = C.setup_torch(args)
    from quantlab.batching import forward_loop
    from quantlab.pipeline import run as run_pipeline

    sections = []
    for samples in (int(s) for s in args.samples.split(",")):
        wl = make_workload(args.model, samples, args.batch_size)
        model, fp32_model = quantized_model(wl, device, fp32_copy=True)

        def fp32() -> None:
            run_batches(fp32_model, wl.batches(device))

        def ptq() -> None:
            run_pipeline(model, forward_loop(wl.batches(device)), CALIBRATORS)

        jobs: Dict[str, Callable[[], None]] = {
            "FP32 inference": fp32,
            "FP32 inference, collector held off": around(fp32, gc.disable, gc.enable),
            "run_ptq": ptq,
            "run_ptq, collector held off": around(ptq, gc.disable, gc.enable),
            "run_ptq, collector frozen": around(ptq, gc.freeze, gc.unfreeze),
            "run_ptq right after gc.collect()": ptq,  # the collection runs before, outside the timing
        }
        for job in jobs.values():  # warm-up: kernels compiled, allocator warm
            job()
        times: Dict[str, List[float]] = {name: [] for name in jobs}
        for _ in range(args.repeats):
            for name, job in jobs.items():
                if name == "run_ptq right after gc.collect()":
                    C.sync(device)
                    gc.collect()
                times[name].append(C.timed(job, device)[0])
        base = st.median(times["FP32 inference"])
        rows = []
        for name, ts in times.items():
            fast = min(ts)
            rows.append([name, f"{min(ts) * 1e3:.1f}", f"{st.median(ts) * 1e3:.1f}", f"{max(ts) * 1e3:.1f}",
                         f"{st.median(ts) / base:.3f}x", f"{sum(t <= fast * 1.03 for t in ts)}/{len(ts)}"])
        sections.append(f"### {args.model}, {samples} samples, batch {args.batch_size}, {args.repeats} interleaved repeats\n\n"
                        + C.markdown_table(["job", "min ms", "median ms", "max ms", "median vs FP32", "calls within 3% of min"], rows))
    C.emit(C.machine_header("Python's garbage collector and run_ptq (diagnose_gc.py)", {"device": str(device)})
           + "\n" + "\n\n".join(sections) + "\n", args.append)


if __name__ == "__main__":
    main()
