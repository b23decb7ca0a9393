"""Where the statistics pass spends its time: torch.profiler over one pass, plus the
pieces of ``HistogramCollector.update`` timed alone on a ReLU-like activation.

    python benchmarks/profile_statistics.py --device cuda --model resnet50 --samples 256
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from _models import make_workload, quantized_model, run_batches  # noqa: E402


def pieces(device: torch.device, shape, repeats: int) -> list:
    from quantlab.statistics import HistogramCollector, _count_slots

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.relu(torch.randn(*shape, generator=g, device=device))  # about half exact zeros
    width = 2.0 ** -9
    n = 4096
    a = x.abs()
    idx64 = a.mul(1 / width).ceil_().sub_(1).clamp_(min=0).to(torch.int64).view(-1)
    idx32 = idx64.to(torch.int32)
    counts = torch.zeros(n, dtype=torch.int64, device=device)
    ones = torch.ones_like(idx64)
    from quantlab import statistics
    from quantlab.statistics import _DeviceAccumulator

    fused = _DeviceAccumulator(2048, x)  # the fused kernels where they compile
    statistics.FUSED_KERNELS = False
    torch_ops = _DeviceAccumulator(2048, x)
    statistics.FUSED_KERNELS = True
    collector = HistogramCollector(2048, sync_free=True)
    collector.update(x)
    host_collector = HistogramCollector(2048, sync_free=False)
    host_collector.update(x)
    steps = {
        "abs": lambda: x.abs(),
        "max + host sync": lambda: float(x.abs().max()),
        "index math (mul, ceil, sub, clamp, to int64)": lambda: a.mul(1 / width).ceil_().sub_(1).clamp_(min=0).to(torch.int64),
        "bincount int64": lambda: torch.bincount(idx64, minlength=n),
        "bincount int32": lambda: torch.bincount(idx32, minlength=n),
        "index math, new (mul, ceil, to int32)": lambda: a.mul(1 / width).ceil_().to(torch.int32),
        "bincount int32, zeros spread over 32 slots (_count_slots)": lambda: _count_slots(idx32, n + 1),
        "scatter_add_ int64": lambda: counts.scatter_add_(0, idx64, ones),
        "histc (float, not exact)": lambda: torch.histc(a, bins=n, min=0.0, max=n * width),
        "HistogramCollector.update, host path (read-back per batch)": lambda: host_collector.update(x),
        "HistogramCollector.update, device path (no read-back; the CUDA default)": lambda: collector.update(x),
        "device path, torch ops (_DeviceAccumulator)": lambda: torch_ops.update(x),
        f"device path, fused kernels ({'compiled' if fused._kernels is not None else 'UNAVAILABLE: torch ops'})": lambda: fused.update(x),
        "FP32 reference: x * 2 (one read, one write)": lambda: x * 2,
    }
    rows = []
    for name, fn in steps.items():
        seconds = C.median_time(fn, repeats=repeats, warmup=2, device=device)
        rows.append([name, seconds * 1e3, x.numel() * 4 / seconds / 1e9])
    return rows


def device_path_checks(device: torch.device) -> list:
    """The device path on ``device`` vs the host path on the CPU: same counts? any host sync?"""
    from quantlab.statistics import HistogramCollector

    g = torch.Generator().manual_seed(1)
    cases = {
        "post-ReLU 64x64x56x56, growing range": [torch.relu(torch.randn(64, 64, 56, 56, generator=g)) * s for s in (0.5, 2.0, 1.0, 9.0)],
        "gaussian, 2^25 elements (histc chunks)": [torch.randn(1 << 25, generator=g)],
        "values on bin edges": [torch.arange(0, 4096.0) * 0.25, torch.arange(0, 64.0)],
        "half precision": [torch.randn(4096, 1024, generator=g).half() * s for s in (0.1, 3.0)],
    }
    rows = []
    for name, batches in cases.items():
        host = HistogramCollector(2048, sync_free=False)
        dev = HistogramCollector(2048, sync_free=True)
        for b in batches:
            host.update(b)
        sync_error = "none"
        if device.type == "cuda":
            moved = [b.to(device) for b in batches]
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                for b in moved:
                    dev.update(b)
            except RuntimeError as e:  # a synchronizing call inside update()
                sync_error = str(e).splitlines()[0][:80]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            for b in batches:
                dev.update(b)
        accumulator = "fused kernels" if getattr(dev._device, "_kernels", None) is not None else "torch ops"
        hs, ds = host.stats(), dev.stats()
        same = ds is not None and hs.bin_width == ds.bin_width and hs.amax == ds.amax and torch.equal(hs.counts, ds.counts.cpu())
        rows.append([name, accumulator,
                     "identical" if same else "DIFFERENT", sync_error])
    return rows


def phase_times(model, fp32_model, wl, device, repeats: int = 3) -> List[List[Any]]:
    """Host clock through one statistics pass and one FP32 pass (``fp32_model``: the model without
    quantizers): setup, enqueueing the batches, waiting for the GPU, and the read-back at the end
    (median ms of ``repeats``)."""
    import statistics as st

    from quantlab import collect_statistics
    from quantlab.batching import forward_loop

    rows: Dict[str, List[float]] = {}

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value * 1000)

    for _ in range(repeats):
        marks: Dict[str, float] = {}
        loop = forward_loop(wl.batches(device))

        def timed_loop(m, loop=loop, marks=marks):
            marks["loop"] = time.perf_counter()
            loop(m)
            marks["enqueued"] = time.perf_counter()
            C.sync(device)
            marks["drained"] = time.perf_counter()

        timed_loop.expected_batches = loop.expected_batches
        C.sync(device)
        start = time.perf_counter()
        collect_statistics(model, timed_loop)
        end = time.perf_counter()
        add("statistics: setup (modes, eval, graph wrapper)", marks["loop"] - start)
        add("statistics: batches enqueued (host)", marks["enqueued"] - marks["loop"])
        add("statistics: GPU still busy after that", marks["drained"] - marks["enqueued"])
        add("statistics: end (modes back, read-back of every tensor)", end - marks["drained"])
        add("statistics: total", end - start)
        C.sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for batch in wl.batches(device):
                fp32_model(batch) if not isinstance(batch, dict) else fp32_model(**batch)
        enqueued = time.perf_counter()
        C.sync(device)
        end = time.perf_counter()
        add("FP32 (no quantizers): batches enqueued (host)", enqueued - start)
        add("FP32 (no quantizers): GPU still busy after that", end - enqueued)
        add("FP32 (no quantizers): total", end - start)
    return [[name, f"{st.median(values):.2f}"] for name, values in rows.items()]


def run_ptq_phases(model, wl, device, repeats: int = 5) -> List[List[Any]]:
    """Host clock and GPU events through one run_ptq-style pipeline call (the calibrators enqueued behind
    the pass, the statistics read back with the first ranges): where the host waits and what is left
    after the read-back (median, min, max ms)."""
    import statistics as st

    from _phases import PipelineMarks
    from quantlab.batching import forward_loop
    from quantlab.pipeline import run as run_pipeline

    rows: Dict[str, List[float]] = {}
    with PipelineMarks(device) as marks:
        for _ in range(repeats):
            C.sync(device)
            marks.start()
            run_pipeline(model, marks.loop(forward_loop(wl.batches(device))), ["max", "percentile", "entropy", "mse"])
            for name, ms in marks.finish().items():
                rows.setdefault(name, []).append(ms)
    return [[name, f"{st.median(values):.2f}", f"{min(values):.2f}", f"{max(values):.2f}"] for name, values in rows.items()]


def calibrator_profile(model, device) -> str:
    """Seconds per calibrator on the statistics the model holds, then where one run's host time goes."""
    import cProfile
    import io
    import pstats

    from quantlab.ptq import parse_calibrators, run_calibrators

    everything = parse_calibrators("all")

    rows = []
    for name in everything:
        C.sync(device)
        seconds, _ = C.timed(lambda: run_calibrators(model, [name]), device)
        rows.append([name, f"{seconds * 1000:.1f}"])
    seconds, _ = C.timed(lambda: run_calibrators(model, everything), device)
    rows.append(["all four (as run_ptq: weights once)", f"{seconds * 1000:.1f}"])
    profiler = cProfile.Profile()
    profiler.enable()
    run_calibrators(model, everything)
    C.sync(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    return ("### Calibrators on the pass's statistics (ms)\n\n" + C.markdown_table(["calibrator", "ms"], rows)
            + f"\n\ncProfile of all four, by own time:\n\n```\n{text.getvalue()[-4000:]}\n```\n")


def _without_entropy_kernels(job):
    """Runs ``job`` with the entropy calibrator's CUDA kernels off (its torch-op form), for comparison."""
    from quantlab.calibrators import entropy_cuda

    saved = entropy_cuda.screen, entropy_cuda.exact
    entropy_cuda.screen = entropy_cuda.exact = lambda *args: None
    try:
        return job()
    finally:
        entropy_cuda.screen, entropy_cuda.exact = saved


def device_breakdown(model, device, repeats: int = 5) -> str:
    """Each calibrator (``choose_many`` on the pass's histograms) and all four as run_ptq runs them:
    wall ms against the GPU's own kernel time, kernel launches and host syncs, from torch.profiler."""
    import statistics as st

    from quantlab.calibrators import choose_many
    from quantlab.pipeline import statistics_of
    from quantlab.ptq import parse_calibrators, run_calibrators

    names = parse_calibrators("all")
    stats = list(statistics_of(model).histograms.values())
    jobs = {f"choose_many({name!r})": (lambda name=name: choose_many(name, stats)) for name in names}
    jobs["choose_many('entropy'), torch ops (kernels off)"] = lambda: _without_entropy_kernels(
        lambda: choose_many("entropy", stats))
    jobs["run_calibrators(all four)"] = lambda: run_calibrators(model, names)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    syncing = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item")
    rows = []
    for label, job in jobs.items():
        job()  # warm-up: kernels compiled, caches filled
        wall = st.median(C.timed(job, device)[0] for _ in range(repeats)) * 1e3
        with torch.profiler.profile(activities=activities) as prof:
            job()
            C.sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.end - e.time_range.start for e in kernels) / 1e3
        launches = sum(1 for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
        syncs = sum(1 for e in prof.events() if e.name in syncing[:1] or e.name in syncing[1:3])
        rows.append([label, f"{wall:.2f}", f"{busy:.2f}", len(kernels), launches, ops, syncs])
    return ("### Calibrators: wall time vs the GPU's own time (torch.profiler; wall = median of "
            f"{repeats})\n\n" + C.markdown_table(
                ["job", "wall ms", "GPU kernel ms", "kernels", "launch calls", "top-level aten ops", "syncs"], rows))


def end_to_end(model, fp32_model, wl, device, repeats: int = 7) -> str:
    """The pass and all four calibrators back to back in one timed region, against FP32 inference
    (``fp32_model``: the model as the user has it, without quantizers)."""
    import statistics as st

    from quantlab import collect_statistics
    from quantlab.batching import forward_loop
    from quantlab.ptq import parse_calibrators, run_calibrators

    names = parse_calibrators("all")

    def both() -> None:
        collect_statistics(model, forward_loop(wl.batches(device)))
        run_calibrators(model, names)

    def fp32() -> None:
        run_batches(fp32_model, wl.batches(device))

    from quantlab import statistics

    def both_counted_per_layer() -> None:  # a tensor feeding several layers read once per layer (as before)
        statistics.COPY_SHARED_INPUTS = False
        try:
            both()
        finally:
            statistics.COPY_SHARED_INPUTS = True

    def pass_only() -> None:
        collect_statistics(model, forward_loop(wl.batches(device)))

    from quantlab.pipeline import run as run_pipeline

    def as_run_ptq() -> None:  # one pipeline call: the calibrators enqueued behind the pass
        run_pipeline(model, forward_loop(wl.batches(device)), names)

    jobs = {"FP32": fp32, "pass + four calibrators (as run_ptq: deferred)": as_run_ptq,
            "pass + four calibrators (two calls)": both,
            "pass + four calibrators, shared inputs counted per layer": both_counted_per_layer, "pass alone": pass_only}
    times: Dict[str, List[float]] = {name: [] for name in jobs}
    for _ in range(repeats):  # interleaved, so drifts of the host hit all alike
        for name, job in jobs.items():
            times[name].append(C.timed(job, device)[0])
    base = st.median(times["FP32"])
    rows = [[k, f"{min(v) * 1e3:.1f}", f"{st.median(v) * 1e3:.1f}", f"{max(v) * 1e3:.1f}", f"{st.median(v) / base:.3f}x"]
            for k, v in times.items()]
    return "### End to end, one timed region\n\n" + C.markdown_table(["job", "min ms", "median ms", "max ms", "/ FP32"], rows)


def host_profile(model, wl, device, samples: int) -> str:
    """Where the host time of one pass goes (Python level, by own time)."""
    import cProfile
    import io
    import pstats

    from quantlab import collect_statistics
    from quantlab.batching import forward_loop

    collect_statistics(model, forward_loop(wl.batches(device)))
    profiler = cProfile.Profile()
    C.sync(device)
    profiler.enable()
    collect_statistics(model, forward_loop(wl.batches(device)))
    C.sync(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    return f"### cProfile of one statistics pass ({samples} samples), by own time\n\n```\n{text.getvalue()[-7000:]}\n```\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    C.add_common_args(parser)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shape", default="64,256,56,56")
    parser.add_argument("--host-profile", action="store_true", help="also cProfile one pass (host time by function)")
    parser.add_argument("--phases", action="store_true", help="only the host-clock phases of a pass vs FP32 (skips the rest)")
    args = parser.parse_args()
    device = C.setup_torch(args)
    from quantlab import collect_statistics
    from quantlab.batching import forward_loop

    out = [C.machine_header("Profile of the statistics pass", {"device": str(device)})]
    if args.phases:
        wl = make_workload(args.model, args.samples, args.batch_size)
        model, fp32_model = quantized_model(wl, device, fp32_copy=True)
        collect_statistics(model, forward_loop(wl.batches(device)))  # warm-up: kernels compiled, state allocated
        out.append(f"### Phases of one pass, {args.model}, {args.samples} samples, batch {args.batch_size} (median ms)\n\n"
                   + C.markdown_table(["phase", "ms"], phase_times(model, fp32_model, wl, device)))
        out.append(f"### One run_ptq call, {args.model}, {args.samples} samples (ms: median, min, max)\n\n"
                   + C.markdown_table(["phase", "median", "min", "max"], run_ptq_phases(model, wl, device)))
        # End to end before any torch.profiler run: a CUDA profiler session leaves launches slower after it.
        out.append(end_to_end(model, fp32_model, wl, device))
        out.append(calibrator_profile(model, device))
        out.append(device_breakdown(model, device))
        if args.host_profile:
            out.append(host_profile(model, wl, device, args.samples))
        C.emit("\n".join(out), args.append)
        return
    shape = tuple(int(s) for s in args.shape.split(","))
    out.append(f"### update() pieces on a ReLU output of shape {shape}\n\n" + C.markdown_table(
        ["step", "median ms", "GB/s of fp32 input"], pieces(device, shape, args.repeats)))
    out.append(f"### device path on {device} vs host path on the CPU\n\n" + C.markdown_table(
        ["case", "accumulator", "counts, width, amax", "synchronizing call in update()"], device_path_checks(device)))
    wl = make_workload(args.model, args.samples, args.batch_size)
    model, _ = quantized_model(wl, device)
    collect_statistics(model, forward_loop(iter([next(iter(wl.batches(device)))])))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        collect_statistics(model, forward_loop(wl.batches(device)))
        C.sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    out.append(f"### torch.profiler, one statistics pass ({args.samples} samples), sorted by {key}\n\n```\n"
               + prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=48) + "\n```\n")
    if args.host_profile:
        out.append(host_profile(model, wl, device, args.samples))
    C.emit("\n".join(out), args.append)


if __name__ == "__main__":
    main()
