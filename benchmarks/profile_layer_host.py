"""Host time per forward of the statistics pass against FP32, on an input so small that the GPU waits on the
host (issue 18): the wall time of a forward is then its host work. Parts of the per-layer path are skipped one
at a time (the statistics call, the kernel launch, the shared-input table, the input hook's move into the
layers' forward) to see what each costs; then a cProfile of the pass's forwards. (It runs on the CPU too,
where the forwards' compute is in the times and the statistics take the host path: a smoke test there.)

    python benchmarks/profile_layer_host.py --device cuda --model resnet50
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import importlib
import io
import pstats
import statistics as st
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from _models import call, make_workload, quantized_model  # noqa: E402

WARMUP = 3


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def timed_forwards(model: torch.nn.Module, batch: Any, count: int, device: torch.device) -> float:
    """ms per forward over ``count`` forwards after a warm-up (the GPU waits on the host throughout)."""
    for _ in range(WARMUP):
        call(model, batch)
    C.sync(device)
    start = time.perf_counter()
    for _ in range(count):
        call(model, batch)
    C.sync(device)
    return (time.perf_counter() - start) * 1000 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    C.add_common_args(parser)
    parser.add_argument("--model", default="resnet50", help="resnet50 or bert-base")
    parser.add_argument("--image-size", type=int, default=32, help="ResNet-50 input side (small: host-bound)")
    parser.add_argument("--forwards", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = C.setup_torch(args)
    from quantlab import pass_calls, statistics
    from quantlab.kernels import histogram_cuda
    from quantlab.pipeline import collect
    from quantlab.tensor_quantizer import TensorQuantizer

    collect_module = importlib.import_module("quantlab.pipeline.collect")  # the package exports its function

    wl = make_workload(args.model, 1, 1)
    model, fp32_model = quantized_model(wl, device, fp32_copy=True)
    batch = next(iter(wl.batches(device)))
    if args.model == "resnet50":
        batch = torch.randn(1, 3, args.image_size, args.image_size, device=device)

    def in_pass(profiler: Any = None) -> float:
        result: List[float] = []

        def loop(m: torch.nn.Module) -> None:
            if profiler is not None:
                profiler.enable()
            result.append(timed_forwards(m, batch, args.forwards, device))
            if profiler is not None:
                profiler.disable()

        collect(model, loop, cuda_graphs=False)
        return result[0]

    def no_op(*_: Any, **__: Any) -> None:
        return None

    jobs: Dict[str, Callable[[], float]] = {
        "FP32 (no quantizers)": lambda: torch.no_grad()(timed_forwards)(fp32_model, batch, args.forwards, device),
        "statistics pass": in_pass,
    }

    def without(owner: Any, name: str, value: Any) -> Callable[[], float]:
        def job() -> float:
            with patched(owner, name, value):
                return in_pass()
        return job

    jobs["pass, input hook kept on the layers"] = without(
        collect_module, "pass_calls", functools.partial(pass_calls.pass_calls, observe_in_forward=False))
    jobs["pass, shared-input table off"] = without(statistics, "COPY_SHARED_INPUTS", False)
    jobs["pass, kernel launch skipped"] = without(histogram_cuda.FusedHistogram, "enqueue", no_op)
    jobs["pass, statistics call skipped (hook only)"] = without(TensorQuantizer, "observe", no_op)
    times: Dict[str, List[float]] = {job: [] for job in jobs}
    for _ in range(args.repeats):
        for job, fn in jobs.items():
            times[job].append(fn())
    fp32 = st.median(times["FP32 (no quantizers)"])
    rows = [[job, f"{min(t):.3f}", f"{st.median(t):.3f}", f"{st.median(t) - fp32:+.3f}"] for job, t in times.items()]
    profiler = cProfile.Profile()
    in_pass(profiler)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(35)
    text = (C.machine_header("Host time per forward: statistics pass against FP32", {"device": str(device)})
            + f"\n### {args.model}, batch of 1 (ResNet-50 at {args.image_size}x{args.image_size}), {args.forwards} forwards"
            f" x {args.repeats} repeats, ms per forward\n\n"
            + C.markdown_table(["job", "min", "median", "median - FP32"], rows)
            + f"\n\ncProfile of {args.forwards + WARMUP} forwards of the pass (profiled times are slower than real):\n\n```\n"
            + out.getvalue() + "```\n")
    C.emit(text, args.append)


if __name__ == "__main__":
    main()
