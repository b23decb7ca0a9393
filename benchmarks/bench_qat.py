"""QAT training-step time vs FP32 training, for a ResNet-18-sized CNN (torch.nn, random init).

One training step = forward + cross-entropy + backward + SGD step on one batch.
Variants, all in the same process and timed in interleaved rounds (so machine
noise hits them alike); min / median / max step time over all timed steps:

* ``fp32``: the plain model;
* ``qat``: ``qat.prepare`` defaults (activation ranges fixed from a max
  calibration, per-channel weight ranges recomputed every step);
* ``qat, quantizers off``: the same prepared model with ``qat.set_enabled(model,
  False)``: the cost of the hooks/parametrizations alone;
* ``qat lsq``: learned activation and weight ranges (LSQ gradients);
* ``qat fold-bn``: BatchNorm folded into the convs (weights quantized as TensorRT folds them);
* ``modelopt``: NVIDIA Model Optimizer's QAT on the same model (``mtq.quantize`` with
  ``INT8_DEFAULT_CFG`` and a max calibration on the same batch, its PyTorch fake-quant
  fallback: its CUDA extension is JIT-built on first use, which takes minutes).

On CUDA each step is timed with CUDA events (and the device synchronized
before reading them); on the CPU with ``time.perf_counter``. To find where a
slow step's time went, every timed step also records the host's enqueue time
(until ``step()`` returns), Python garbage collections that ran inside it and
the CUDA caching allocator's device allocations (``cudaMalloc``) it made; one
extra step per variant counts host-device synchronizations
(``torch.cuda.set_sync_debug_mode``). ``--gc freeze`` freezes the objects alive
after set-up (``gc.freeze``) so collections inside the timed steps only scan
what the steps create.

Examples:
    .venv/bin/python benchmarks/bench_qat.py                       # CPU: batch 16 at 112x112
    python benchmarks/bench_qat.py --device cuda --batch-size 128 --resolution 224
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, emit, machine_header, markdown_table, setup_torch  # noqa: E402

from quantlab import qat  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (11.7M parameters), random init."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward: Optional[Callable[..., torch.Tensor]] = None) -> Callable[[], None]:
    """One SGD training step of ``model`` (through ``forward``, e.g. its CUDA-graphed form, if given)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    call = forward or model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(call(x), y).backward()
        optimizer.step()

    return step


class _GCWatch:
    """Counts Python garbage collections and their pause time (gc.callbacks)."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._start


def _device_allocs(device: torch.device) -> int:
    """cudaMalloc calls of the caching allocator so far (segments allocated)."""
    return int(torch.cuda.memory_stats(device).get("segment.all.allocated", 0)) if device.type == "cuda" else 0


def time_steps(step: Callable[[], None], n: int, device: torch.device, watch: Optional[_GCWatch] = None,
               sync_every: int = 1) -> List[Dict[str, float]]:
    """Runs ``n`` steps; per record: seconds per step, host enqueue seconds per step, GC pauses, cudaMallocs.

    With ``sync_every`` 1 each step is one record and starts on an idle GPU (every
    host stall at its start shows). With ``sync_every`` k, each record is a block of
    k back-to-back steps, synchronized once, as a training loop that reads its loss
    only now and then runs: the host enqueues ahead while the GPU works through the
    previous step, so host time hides under GPU time where it is shorter on average.
    """
    records = []
    for _ in range(max(1, n // sync_every)):
        gcs, gc_s = (watch.count, watch.seconds) if watch else (0, 0.0)
        allocs = _device_allocs(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(sync_every):
                step()
            host = time.perf_counter() - t0
            end.record()
            torch.cuda.synchronize(device)
            seconds = start.elapsed_time(end) / 1000.0
        else:
            for _ in range(sync_every):
                step()
            host = seconds = time.perf_counter() - t0
        records.append({"s": seconds / sync_every, "host": host / sync_every, "gc": (watch.count - gcs) if watch else 0,
                        "gc_s": (watch.seconds - gc_s) if watch else 0.0, "malloc": _device_allocs(device) - allocs})
    return records


def count_syncs(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """Host-device synchronizations in one step (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def modelopt_qat(base: nn.Module, calib: torch.Tensor) -> nn.Module:
    """Model Optimizer's QAT preparation: INT8_DEFAULT_CFG, max calibration on ``calib``."""
    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization import extensions

    if calib.is_cuda:
        extensions.get_cuda_ext.extension = None  # its PyTorch fake-quant fallback (no minutes-long JIT build)

    def loop(m: nn.Module) -> None:
        with torch.no_grad():
            m(calib)

    return mtq.quantize(copy.deepcopy(base), copy.deepcopy(mtq.INT8_DEFAULT_CFG), loop)


def _warm_gpu(device: torch.device, seconds: float) -> None:
    """Matrix products for ``seconds`` so the clocks are up before anything is timed."""
    if device.type != "cuda" or seconds <= 0:
        return
    a = torch.randn(4096, 4096, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 16 on the CPU")
    parser.add_argument("--resolution", type=int, default=None, help="default 224 on CUDA, 112 on the CPU")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant per round (default 20 CUDA, 2 CPU; a multiple of --sync-every)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default 10 CUDA, 1 CPU)")
    parser.add_argument("--warm-gpu", type=float, default=2.0, help="seconds of matrix products before timing (clocks up)")
    parser.add_argument("--gc", choices=("on", "freeze", "off"), default="on",
                        help="Python GC during the timed steps: as is, gc.freeze() after set-up, or disabled")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--profile", default="", help="comma list of variants to profile (3 steps each) after timing")
    parser.add_argument("--variants", default="fp32,qat,qat-off,qat-lsq,qat-fold-bn")
    parser.add_argument("--label", default="", help="a note for the table's title (e.g. the run number)")
    parser.add_argument("--sync-every", type=int, default=1,
                        help="synchronize after blocks of this many steps (a record per block; 1: per step)")
    args = parser.parse_args()
    device = setup_torch(args)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    batch = args.batch_size or (128 if cuda else 16)
    res = args.resolution or (224 if cuda else 112)
    steps = args.steps or (20 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, res, res, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    base = ResNet18().to(device).to(memory_format=fmt)
    calib = [(x[: min(batch, 32)], None)]

    builders: Dict[str, Callable[[], nn.Module]] = {
        "fp32": lambda: copy.deepcopy(base),
        "qat": lambda: qat.prepare(copy.deepcopy(base), data=calib, calibrator="max"),
        "qat-off": lambda: _disabled(qat.prepare(copy.deepcopy(base), data=calib, calibrator="max")),
        "qat-lsq": lambda: qat.prepare(copy.deepcopy(base), data=calib, calibrator="max", learn_amax=True, weight_ranges="learn"),
        "qat-fold-bn": lambda: qat.prepare(copy.deepcopy(base), data=calib, calibrator="max", fold_bn=True),
        "modelopt": lambda: modelopt_qat(base, x[: min(batch, 32)]),
        # torch.compile fuses the fake-quant elementwise work into neighbouring kernels.
        "fp32-compiled": lambda: torch.compile(copy.deepcopy(base)),
        "qat-compiled": lambda: torch.compile(qat.prepare(copy.deepcopy(base), data=calib, calibrator="max")),
    }
    labels = {"fp32": "FP32 training", "qat": "QAT (fixed act. ranges, weight ranges recomputed)",
              "qat-off": "QAT model, quantizers off", "qat-lsq": "QAT, learned ranges (LSQ)",
              "qat-fold-bn": "QAT, BN folded", "modelopt": "Model Optimizer QAT (INT8_DEFAULT_CFG, PyTorch fake quant)",
              "fp32-compiled": "FP32 training, torch.compile", "qat-compiled": "QAT, torch.compile"}
    for name in ("fp32", "qat", "qat-lsq", "qat-fold-bn"):
        labels[f"{name}-graphed"] = f"{labels[name]}, CUDA graphs (qat.graphed)"
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(builders)}")
    step_fns: Dict[str, Callable[[], None]] = {}
    skipped: Dict[str, str] = {}
    for name in names:
        try:
            if name.endswith("-graphed"):  # the same model, its forward and backward replayed as CUDA graphs
                model = builders[name[: -len("-graphed")]]().train()
                step_fns[name] = make_step(model, x, y, forward=qat.graphed(model, x))
                continue
            step_fns[name] = make_step(builders[name](), x, y)
        except ImportError as exc:  # Model Optimizer not installed: say so in the table
            skipped[name] = f"not run: {exc}"
    names = [n for n in names if n in step_fns]
    syncs = {name: count_syncs(step_fns[name], device) for name in names}  # also a first (untimed) step
    _warm_gpu(device, args.warm_gpu)
    for name in names:
        time_steps(step_fns[name], warmup, device)
    watch = _GCWatch()
    gc.callbacks.append(watch)
    if args.gc == "freeze":
        gc.collect()
        gc.freeze()
    elif args.gc == "off":
        gc.collect()
        gc.disable()
    records: Dict[str, List[Dict[str, float]]] = {name: [] for name in names}
    round_medians: Dict[str, List[float]] = {name: [] for name in names}
    try:
        for _ in range(args.rounds):
            for name in names:
                got = time_steps(step_fns[name], steps, device, watch, args.sync_every)
                records[name] += got
                round_medians[name].append(statistics.median(r["s"] for r in got))
    finally:
        gc.callbacks.remove(watch)
        gc.enable()
        gc.unfreeze()
    median = {name: statistics.median(r["s"] for r in rs) for name, rs in records.items()}
    reference = median.get("fp32")
    rows = []
    for name in names:
        t = sorted(r["s"] for r in records[name])
        med = median[name]
        base_time = median.get("fp32-compiled") if name.endswith("-compiled") else reference
        slow = [r for r in records[name] if r["s"] > 1.1 * med]
        rows.append([
            labels[name], t[0] * 1e3, med * 1e3, t[-1] * 1e3, f"{t[-1] / med:.2f}",
            f"{med / base_time:.2f}x" if base_time else "-",
            statistics.median(r["host"] for r in records[name]) * 1e3,
            syncs[name] if syncs[name] is not None else "-",
            f"{sum(r['gc'] for r in records[name])} / {max((r['gc_s'] for r in records[name]), default=0) * 1e3:.1f}",
            sum(r["malloc"] for r in records[name]),
            f"{len(slow)}: {sum(r['gc'] > 0 for r in slow)} GC, {sum(r['malloc'] > 0 for r in slow)} malloc, "
            f"{sum(r['host'] > 0.9 * r['s'] for r in slow)} host-bound",
            ", ".join(f"{m * 1e3:.1f}" for m in round_medians[name]),
        ])
    for name, why in skipped.items():
        rows.append([labels[name], None, None, None, None, None, None, None, None, None, why, ""])
    profile = ""
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        for name in [v.strip() for v in args.profile.split(",") if v.strip() in step_fns]:
            with torch.profiler.profile(activities=activities) as prof:
                time_steps(step_fns[name], 3, device)
            key = "cuda_time_total" if cuda else "cpu_time_total"
            profile += (f"\n### torch.profiler, 3 steps of {labels[name]}, by {key}\n\n```\n"
                        + prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60) + "\n```\n")
    title = f"QAT step time, ResNet-18-sized CNN, batch {batch}, {res}x{res}, {device.type}" + (f" ({args.label})" if args.label else "")
    section = machine_header(title, {"timed steps per variant": steps * args.rounds, "steps per timed record": args.sync_every,
                                     "warm-up steps": warmup,
                                     "GC": args.gc, "cudnn.benchmark": args.cudnn_benchmark, "channels_last": args.channels_last})
    section += "\n" + markdown_table(
        ["variant", "min ms", "median ms", "max ms", "max/median", "vs FP32 (median)", "host enqueue ms (median)",
         "syncs/step", "GCs in timed steps / longest ms", "cudaMallocs in timed steps",
         "steps > 1.1x median: with GC, malloc, host-bound", "per-round medians ms"], rows)
    emit(section + profile, args.append)


def _disabled(model: nn.Module) -> nn.Module:
    qat.set_enabled(model, False)
    return model


if __name__ == "__main__":
    main()
