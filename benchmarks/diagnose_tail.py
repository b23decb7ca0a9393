"""What the host does after run_ptq's read-back in its slow calls (issue 18). bench_calibration's phase tables showed
the host's work after the read-back (statistics, settle, apply, scales) at 5-7 ms in most calls but 40-65 ms in a
few (BERT-base at 512 samples: 3 of 18; ResNet-50 at 1,024: 1 of 18). Here every pipeline call runs right after FP32
inference, as there, with a profiler (cProfile) running from the read-back to the call's return; the slowest calls'
profiles are printed beside the median call's.

    python benchmarks/diagnose_tail.py --device cuda --model bert-base --samples 512 --repeats 30
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics as st
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from _models import make_workload, quantized_model, run_batches  # noqa: E402

CALIBRATORS = ["max", "percentile", "entropy", "mse"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    C.add_common_args(parser)
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--show", type=int, default=3, help="profiles of this many slowest calls")
    args = parser.parse_args()
    device = C.setup_torch(args)
    from quantlab.batching import forward_loop
    from quantlab.pipeline import run as run_pipeline
    from quantlab.pipeline.types import Statistics

    wl = make_workload(args.model, args.samples, args.batch_size)
    model, fp32_model = quantized_model(wl, device, fp32_copy=True)
    state: Dict[str, Any] = {}
    complete = Statistics.complete

    def profiled_complete(statistics: Any, scalars: Any) -> None:  # the read-back is in: profile from here on
        if "profiler" not in state:
            state["read"] = time.perf_counter()
            state["profiler"] = cProfile.Profile()
            state["profiler"].enable()
        return complete(statistics, scalars)

    Statistics.complete = profiled_complete
    calls: List[Dict[str, Any]] = []
    for index in range(args.repeats + 2):
        run_batches(fp32_model, wl.batches(device))
        C.sync(device)
        state.clear()
        start = time.perf_counter()
        run_pipeline(model, forward_loop(wl.batches(device)), CALIBRATORS)
        end = time.perf_counter()
        profiler = state.get("profiler")
        if profiler is None:
            continue
        profiler.disable()
        C.sync(device)
        if index < 2:  # warm-up
            continue
        calls.append({"index": index, "total_ms": (end - start) * 1e3, "tail_ms": (end - state["read"]) * 1e3,
                      "profiler": profiler})
    Statistics.complete = complete
    if not calls:
        sys.exit("no call read a deferred pass back (the pass defers on CUDA only): nothing to show")
    tails = [c["tail_ms"] for c in calls]
    median = st.median(tails)
    ordered = sorted(calls, key=lambda c: -c["tail_ms"])
    lines = [C.machine_header("Host work after run_ptq's read-back (diagnose_tail.py)", {"device": str(device)}),
             f"\n### {args.model}, {args.samples} samples, batch {args.batch_size}, {len(calls)} calls (each right after FP32 inference)\n",
             f"- Tail after the read-back, ms: min {min(tails):.2f}, median {median:.2f}, max {max(tails):.2f}; "
             f"calls over 2x the median: {sum(t > 2 * median for t in tails)} of {len(tails)}",
             "- Per call (run order), total / tail ms: " + "; ".join(f"{c['total_ms']:.1f} / {c['tail_ms']:.1f}" for c in calls)]
    median_call = min(calls, key=lambda c: abs(c["tail_ms"] - median))
    for label, call in [(f"slowest #{i + 1}", c) for i, c in enumerate(ordered[:args.show])] + [("median", median_call)]:
        out = io.StringIO()
        pstats.Stats(call["profiler"], stream=out).sort_stats("tottime").print_stats(18)
        text = out.getvalue()
        body = text[text.find("ncalls"):] if "ncalls" in text else text
        lines.append(f"\n{label} call (run {call['index']}, tail {call['tail_ms']:.1f} ms), by own time:\n\n```\n{body.rstrip()}\n```")
    C.emit("\n".join(lines) + "\n", args.append)


if __name__ == "__main__":
    main()
