"""What a CUDA-graph capture costs inside run_ptq's statistics pass, and what the GPU does meanwhile (issue 18).

Graphs make the pass immune to a slow host (every replay is one launch), but the capture at the pass's
fourth call leaves the GPU idle while the host records the forward: the eager calls before it keep the
host only a few ms ahead of the GPU. Jobs, interleaved: FP32 inference, run_ptq as shipped (graphed from
quantlab.cuda_graphs.MIN_BATCHES batches on), run_ptq with graphs off, run_ptq graphed always;
``--host-delay-ms`` adds host time per batch to every job (a slower host). Per job: the host time of the
eager batches 2 and 3 (the launch queue is not full yet, so this is the host's own work per batch), the
capture split into its parts (the forward recorded, ``capture_end`` with the instantiation, the first
replay's launch), device allocations (``cudaMalloc``) during the call, and the GPU's longest batch
against its median (the idle gap at the capture).

    python benchmarks/diagnose_graph_capture.py --device cuda --model resnet50 --samples 1024 --repeats 8
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

import torch  # noqa: E402

import _common as C  # noqa: E402
from diagnose_pass_spread import (BatchMarks, CALIBRATORS, add_pass_args, fp32_inference,  # noqa: E402
                                  pass_setup, per_job_table)


class CaptureClock:
    """Host times of the parts of each capture (patched into quantlab.cuda_graphs for the run)."""

    def __init__(self, profiler: Any = None) -> None:
        self.profiler = profiler  # a cProfile.Profile enabled during every capture, if given
        self.reset()

    def reset(self) -> None:
        self.parts = {"capture": 0.0, "capture_end": 0.0, "first replay": 0.0}

    def install(self) -> None:
        from quantlab import cuda_graphs

        clock = self
        base = torch.cuda.CUDAGraph

        class TimedGraph(base):  # type: ignore[misc, valid-type]
            replays = 0

            def capture_end(self) -> None:
                start = time.perf_counter()
                super().capture_end()
                clock.parts["capture_end"] += (time.perf_counter() - start) * 1000

            def replay(self) -> None:
                start = time.perf_counter()
                super().replay()
                if self.replays == 0:
                    clock.parts["first replay"] += (time.perf_counter() - start) * 1000
                self.replays += 1

        torch.cuda.CUDAGraph = TimedGraph
        capture = cuda_graphs.GraphedForward._capture

        def timed_capture(graphed: Any, args: tuple, kwargs: dict) -> Any:
            start = time.perf_counter()
            if clock.profiler is not None:
                clock.profiler.enable()
            try:
                return capture(graphed, args, kwargs)
            finally:
                if clock.profiler is not None:
                    clock.profiler.disable()
                clock.parts["capture"] += (time.perf_counter() - start) * 1000

        cuda_graphs.GraphedForward._capture = timed_capture


def device_allocs(device: torch.device) -> int:
    return int(torch.cuda.memory_stats(device).get("num_device_alloc", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_pass_args(parser, repeats=8)
    parser.add_argument("--host-delay-ms", type=float, default=0.0,
                        help="host time added after every batch of every job (busy wait): a slower host")
    parser.add_argument("--profile", action="store_true", help="cProfile every capture; print the top functions")
    args = parser.parse_args()
    from quantlab import cuda_graphs as graph_replay
    from quantlab.batching import forward_loop
    from quantlab.pipeline import run as run_pipeline

    device, wl, model, fp32_model = pass_setup(args)
    profiler = cProfile.Profile() if args.profile else None
    clock = CaptureClock(profiler)
    clock.install()
    settings = ("MIN_BATCHES", "EAGER_CALLS")
    defaults = {name: getattr(graph_replay, name) for name in settings}
    never = 10 ** 9
    jobs: Dict[str, Any] = {  # cuda_graphs settings per job (None: FP32 inference)
        "FP32": None,
        "run_ptq as shipped": {},
        "run_ptq eager (graphs off)": {"MIN_BATCHES": never},
        "run_ptq graphed always (capture at call 4)": {"MIN_BATCHES": 1},
    }
    marks = BatchMarks()

    def after_batch(*_: Any) -> None:
        marks.mark()
        if args.host_delay_ms:  # a slower host: more host work per batch, the same for every job
            end = time.perf_counter() + args.host_delay_ms / 1000
            while time.perf_counter() < end:
                pass
    rows: List[List[Any]] = []
    totals: Dict[str, List[float]] = {}
    for repeat in range(args.repeats):
        for job, setting in jobs.items():
            clock.reset()
            C.sync(device)
            allocs = device_allocs(device)
            marks.start()
            start = time.perf_counter()
            if job == "FP32":
                fp32_inference(fp32_model, wl, device, after_batch)
            else:
                for name, value in setting.items():
                    setattr(graph_replay, name, value)
                try:
                    run_pipeline(model, forward_loop(wl.batches(device), progress=after_batch), CALIBRATORS)
                finally:
                    for name, value in defaults.items():
                        setattr(graph_replay, name, value)
            C.sync(device)
            total = time.perf_counter() - start
            s = marks.summary(total)
            host = [(b - a) * 1000 for a, b in zip(marks.host, marks.host[1:])]
            gpu = [marks.events[0].elapsed_time(e) for e in marks.events]
            per_batch = [b - a for a, b in zip(gpu, gpu[1:])]
            rows.append([repeat + 1, job, f"{s['total ms']:.1f}", f"{s['GPU done ms']:.1f}",
                         f"{host[1]:.2f}", f"{host[2]:.2f}", f"{clock.parts['capture']:.1f}",
                         f"{clock.parts['capture_end']:.1f}", f"{clock.parts['first replay']:.2f}",
                         device_allocs(device) - allocs, f"{max(per_batch) - st.median(per_batch):.1f}"])
            totals.setdefault(job, []).append(s["total ms"])
    header = ["repeat", "job", "total ms", "GPU: last batch done at", "host ms, batch 2", "host ms, batch 3",
              "capture ms (host)", "of it capture_end", "first replay launch ms", "cudaMalloc calls",
              "GPU: longest batch - median, ms"]
    text = (C.machine_header("What a CUDA-graph capture costs in the statistics pass", {"device": str(device)})
            + f"\n### {args.model}, {args.samples} samples, batch {args.batch_size}, jobs interleaved,"
            f" {args.host_delay_ms:g} ms of extra host time per batch\n\n"
            + C.markdown_table(header, rows) + per_job_table(totals))
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        text += "\n\nProfile of every capture (profiled times are slower than real ones):\n\n```\n" + out.getvalue() + "```\n"
    C.emit(text, args.append)


if __name__ == "__main__":
    main()
