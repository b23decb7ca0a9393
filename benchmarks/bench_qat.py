"""QAT training-step time vs FP32 training, for a ResNet-18-sized CNN (torch.nn, random init).

One training step = forward + cross-entropy + backward + SGD step on one batch.
Variants, all in the same process and timed in interleaved rounds (so machine
noise hits them alike), median step time over all timed steps:

* ``fp32``: the plain model;
* ``qat``: ``qat.prepare`` defaults (activation ranges fixed from a max
  calibration, per-channel weight ranges recomputed every step);
* ``qat, quantizers off``: the same prepared model with ``qat.set_enabled(model,
  False)``: the cost of the hooks/parametrizations alone;
* ``qat lsq``: learned activation and weight ranges (LSQ gradients);
* ``qat fold-bn``: BatchNorm folded into the convs (weights quantized as TensorRT folds them).

On CUDA each step is timed with CUDA events (and the device synchronized
before reading them); on the CPU with ``time.perf_counter``.

Examples:
    .venv/bin/python benchmarks/bench_qat.py                       # CPU: batch 16 at 112x112
    python benchmarks/bench_qat.py --device cuda --batch-size 128 --resolution 224
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

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


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> List[float]:
    times = []
    for _ in range(n):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 16 on the CPU")
    parser.add_argument("--resolution", type=int, default=None, help="default 224 on CUDA, 112 on the CPU")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (default 10 CUDA, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--profile", default="", help="comma list of variants to profile (3 steps each) after timing")
    parser.add_argument("--variants", default="fp32,qat,qat-off,qat-lsq,qat-fold-bn")
    args = parser.parse_args()
    device = setup_torch(args)
    cuda = device.type == "cuda"
    batch = args.batch_size or (128 if cuda else 16)
    res = args.resolution or (224 if cuda else 112)
    steps = args.steps or (10 if cuda else 2)
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
        # torch.compile fuses the fake-quant elementwise work into neighbouring kernels.
        "fp32-compiled": lambda: torch.compile(copy.deepcopy(base)),
        "qat-compiled": lambda: torch.compile(qat.prepare(copy.deepcopy(base), data=calib, calibrator="max")),
    }
    labels = {"fp32": "FP32 training", "qat": "QAT (fixed act. ranges, weight ranges recomputed)",
              "qat-off": "QAT model, quantizers off", "qat-lsq": "QAT, learned ranges (LSQ)",
              "qat-fold-bn": "QAT, BN folded", "fp32-compiled": "FP32 training, torch.compile",
              "qat-compiled": "QAT, torch.compile"}
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(builders)}")
    step_fns = {name: make_step(builders[name](), x, y) for name in names}
    for name in names:
        time_steps(step_fns[name], args.warmup, device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            times[name] += time_steps(step_fns[name], steps, device)
    median = {name: statistics.median(t) for name, t in times.items()}
    reference = median.get("fp32")
    rows = []
    for name in names:
        spread = (min(times[name]) * 1000, max(times[name]) * 1000)
        base_time = median.get("fp32-compiled") if name.endswith("-compiled") else reference
        rows.append([labels[name], median[name] * 1000, f"{spread[0]:.1f}-{spread[1]:.1f}",
                     f"{median[name] / base_time:.2f}x" if base_time else "-"])
    profile = ""
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        for name in [v.strip() for v in args.profile.split(",") if v.strip() in step_fns]:
            with torch.profiler.profile(activities=activities) as prof:
                time_steps(step_fns[name], 3, device)
            key = "cuda_time_total" if cuda else "cpu_time_total"
            profile += (f"\n### torch.profiler, 3 steps of {labels[name]}, by {key}\n\n```\n"
                        + prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60) + "\n```\n")
    title = f"QAT step time, ResNet-18-sized CNN, batch {batch}, {res}x{res}, {device.type}"
    section = machine_header(title, {"timed steps per variant": steps * args.rounds, "channels_last": args.channels_last})
    section += "\n" + markdown_table(["variant", "median ms/step", "min-max ms", "vs FP32 (compiled vs compiled)"], rows)
    emit(section + profile, args.append)


def _disabled(model: nn.Module) -> nn.Module:
    qat.set_enabled(model, False)
    return model


if __name__ == "__main__":
    main()
