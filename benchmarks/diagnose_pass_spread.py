"""Why the same statistics pass takes 0.17 s in one run and 0.26 s in the next (issue 18): per batch, when
the host finished enqueuing it and when the GPU finished running it, for FP32 inference (the model without
quantizers) and run_ptq's one call (as it is, with the per-layer host path it had before 2026-12-03, and
graphed) interleaved. A GPU that finishes a batch before the host has enqueued the next one sat idle (the pass
was host-bound there); batches that take the GPU longer point at the device instead.

    python benchmarks/diagnose_pass_spread.py --device cuda --model resnet50 --samples 1024 --repeats 12
"""
from __future__ import annotations

import argparse
import contextlib
import statistics as st
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from _models import call, make_workload, quantized_model  # noqa: E402


class BatchMarks:
    """Host clock and a CUDA event after each batch is enqueued (``progress`` of a forward loop)."""

    def __init__(self) -> None:
        self.host: List[float] = []
        self.events: List[Any] = []

    def start(self) -> None:
        self.host.clear()
        self.events.clear()
        self.mark()

    def mark(self, *_: Any) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)
        self.host.append(time.perf_counter())

    def summary(self, total_s: float) -> Dict[str, float]:
        """After a sync: when the host enqueued the last batch and the GPU finished it, GPU ms per batch
        (median, max) and how many batches the GPU finished right after the host enqueued them."""
        gpu_done = [self.events[0].elapsed_time(e) for e in self.events]  # ms since the start mark
        host_done = [(t - self.host[0]) * 1000 for t in self.host]
        per_batch = [b - a for a, b in zip(gpu_done, gpu_done[1:])]
        # A batch the GPU finished right after the host enqueued it was waiting on the host (host-bound there).
        host_bound = sum(1 for h, g in zip(host_done[1:], gpu_done[1:]) if g - h < 0.5)
        return {"total ms": total_s * 1000, "host enqueue ms": host_done[-1], "GPU done ms": gpu_done[-1],
                "GPU ms/batch median": st.median(per_batch), "GPU ms/batch max": max(per_batch),
                "host-bound batches": host_bound}


@contextlib.contextmanager
def per_layer_path_as_before() -> Iterator[None]:
    """The statistics pass's per-layer host path before 2026-12-03 (same statistics): weights read through
    torch's parametrizations, the input hook run by nn.Module's slow path, the input quantizer called as a module
    from the hook. (The collectors' leaner path of the same day stays: a microsecond or two per layer.)"""
    import importlib

    from quantlab import attach

    collect = importlib.import_module("quantlab.pipeline.collect")  # the module (the package exports its function)

    calls, plainly = collect.pass_calls, attach._calls_plainly
    collect.pass_calls = lambda model, refs=None: contextlib.nullcontext(model)
    attach._calls_plainly = lambda module: False
    try:
        yield
    finally:
        collect.pass_calls, attach._calls_plainly = calls, plainly


CALIBRATORS = ["max", "percentile", "entropy", "mse"]


def add_pass_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The options of a run that interleaves FP32 inference and run_ptq on one workload."""
    C.add_common_args(parser)
    parser.add_argument("--model", default="resnet50", help="resnet50 or bert-base")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=repeats)


def pass_setup(args: argparse.Namespace) -> Tuple[torch.device, Any, torch.nn.Module, torch.nn.Module]:
    """The CUDA device, the workload, its quantized model (warmed up by one run_ptq: kernels compiled) and
    an FP32 copy without quantizers."""
    from quantlab.batching import forward_loop
    from quantlab.pipeline import run as run_pipeline

    device = C.setup_torch(args)
    if device.type != "cuda":
        raise SystemExit("needs a CUDA device (GPU events)")
    wl = make_workload(args.model, args.samples, args.batch_size)
    model, fp32_model = quantized_model(wl, device, fp32_copy=True)
    run_pipeline(model, forward_loop(wl.batches(device)), CALIBRATORS)
    return device, wl, model, fp32_model


def fp32_inference(fp32_model: torch.nn.Module, wl: Any, device: torch.device, after_batch: Callable[[], Any]) -> None:
    """FP32 inference over the workload's batches, ``after_batch()`` after each."""
    with torch.no_grad():
        for batch in wl.batches(device):
            call(fp32_model, batch)
            after_batch()


def per_job_table(totals: Dict[str, List[float]]) -> str:
    """Per job, ms (min / median / max) and median / FP32's median, as a markdown section."""
    fp32 = st.median(totals["FP32"])
    return ("\n\nPer job, ms (min / median / max) and median / FP32's median:\n\n"
            + C.markdown_table(["job", "min", "median", "max", "/ FP32"], [
                [job, f"{min(t):.1f}", f"{st.median(t):.1f}", f"{max(t):.1f}", f"{st.median(t) / fp32:.3f}x"]
                for job, t in totals.items()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_pass_args(parser, repeats=12)
    args = parser.parse_args()
    from quantlab import cuda_graphs as graph_replay
    from quantlab.batching import forward_loop
    from quantlab.pipeline import run as run_pipeline

    device, wl, model, fp32_model = pass_setup(args)
    default_min_batches, default_eager_calls = graph_replay.MIN_BATCHES, graph_replay.EAGER_CALLS
    marks = BatchMarks()
    rows: List[List[Any]] = []
    totals: Dict[str, List[float]] = {}
    for repeat in range(args.repeats):
        for job in ("FP32", "run_ptq", "run_ptq, per-layer path as before 2026-12-03", "run_ptq, graphed, captured at call 4"):
            C.sync(device)
            marks.start()
            start = time.perf_counter()
            if job == "FP32":
                fp32_inference(fp32_model, wl, device, marks.mark)
            elif "as before" in job:
                with per_layer_path_as_before():
                    run_pipeline(model, forward_loop(wl.batches(device), progress=marks.mark), CALIBRATORS)
            else:  # graphed: every batch after the first replays one CUDA graph (one launch instead of hundreds)
                graph_replay.MIN_BATCHES = 1 if "graphed" in job else default_min_batches
                graph_replay.EAGER_CALLS = int(job[-1]) - 1 if "graphed" in job else default_eager_calls
                run_pipeline(model, forward_loop(wl.batches(device), progress=marks.mark), CALIBRATORS)
                graph_replay.MIN_BATCHES, graph_replay.EAGER_CALLS = default_min_batches, default_eager_calls
            C.sync(device)
            total = time.perf_counter() - start
            s = marks.summary(total)
            rows.append([repeat + 1, job] + [f"{v:.1f}" for v in s.values()])
            totals.setdefault(job, []).append(s["total ms"])
    header = ["repeat", "job", "total ms", "host: last batch enqueued at", "GPU: last batch done at",
              "GPU ms/batch, median", "GPU ms/batch, max", "batches done < 0.5 ms after enqueued (host-bound)"]
    text = (C.machine_header("Where a slow statistics pass loses its time", {"device": str(device)})
            + f"\n### {args.model}, {args.samples} samples, batch {args.batch_size}, FP32 and run_ptq interleaved\n\n"
            + C.markdown_table(header, rows) + per_job_table(totals))
    C.emit(text, args.append)


if __name__ == "__main__":
    main()
