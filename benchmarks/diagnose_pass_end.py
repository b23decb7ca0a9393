"""Where a graphed run_ptq loses its time at the pass's end (issue 18): FP32 inference and run_ptq interleaved,
run_ptq as shipped, with the pass's CUDA graphs released only after run_ptq returns, and with graphs off.
For each run_ptq call: the host time of releasing the graphs (as shipped), and the host time from the
pass's last batch to run_ptq's return.

    python benchmarks/diagnose_pass_end.py --device cuda --model resnet50 --samples 1024
"""
from __future__ import annotations

import argparse
import statistics as st
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from diagnose_pass_spread import CALIBRATORS, add_pass_args, fp32_inference, pass_setup, per_job_table  # noqa: E402


class TimedRelease(dict):
    """A GraphedForward's graphs: times their release (``clear``), or keeps them alive past it."""

    kept: List[Any] = []
    seconds: List[float] = []
    keep = False

    def clear(self) -> None:
        start = time.perf_counter()
        if TimedRelease.keep:
            TimedRelease.kept.append(dict(self))
        super().clear()
        TimedRelease.seconds.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_pass_args(parser, repeats=9)
    args = parser.parse_args()
    from quantlab import cuda_graphs as graph_replay
    from quantlab.batching import forward_loop
    from quantlab.pipeline import run as run_pipeline

    device, wl, model, fp32_model = pass_setup(args)
    original_init = graph_replay.GraphedForward.__init__

    def init(self: Any, *a: Any, **k: Any) -> None:
        original_init(self, *a, **k)
        self.graphs = TimedRelease()

    graph_replay.GraphedForward.__init__ = init
    default_min_batches = graph_replay.MIN_BATCHES
    jobs = ["FP32", "run_ptq", "run_ptq, graphs released after it returns", "run_ptq, graphs off"]
    totals: Dict[str, List[float]] = {job: [] for job in jobs}
    tails: Dict[str, List[float]] = {job: [] for job in jobs[1:]}
    releases: List[float] = []
    for _ in range(args.repeats):
        for job in jobs:
            C.sync(device)
            last_batch = [0.0]
            start = time.perf_counter()
            if job == "FP32":
                fp32_inference(fp32_model, wl, device, lambda: None)
            else:
                TimedRelease.keep = "after it returns" in job
                graph_replay.MIN_BATCHES = 10 ** 9 if "off" in job else default_min_batches
                TimedRelease.seconds.clear()
                run_pipeline(model, forward_loop(wl.batches(device),
                                                 progress=lambda *_: last_batch.__setitem__(0, time.perf_counter())),
                             CALIBRATORS)
                tails[job].append((time.perf_counter() - last_batch[0]) * 1000)
                if job == "run_ptq":
                    releases.extend(s * 1000 for s in TimedRelease.seconds)
            C.sync(device)
            totals[job].append((time.perf_counter() - start) * 1000)
            TimedRelease.kept.clear()
        graph_replay.MIN_BATCHES = default_min_batches
    rows = [[job, f"{min(t):.1f}", f"{st.median(t):.1f}", f"{max(t):.1f}"] for job, t in tails.items()]
    text = (C.machine_header("The end of a graphed statistics pass", {"device": str(device)})
            + f"\n### {args.model}, {args.samples} samples, batch {args.batch_size}, FP32 and run_ptq interleaved\n"
            + per_job_table(totals)
            + "\n\nHost ms from the last batch's enqueue to run_ptq's return (min / median / max):\n\n"
            + C.markdown_table(["job", "min", "median", "max"], rows)
            + "\n\nHost ms releasing the graphs, as shipped: "
            + (", ".join(f"{v:.2f}" for v in releases) or "none released") + "\n")
    C.emit(text, args.append)


if __name__ == "__main__":
    main()
