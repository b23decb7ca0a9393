"""Step time of the built-in QAT loop (``quantlab.qat.train``), eager vs CUDA graphs.

bench_qat.py times a hand-written training step; this times the loop that
``quantlab qat`` runs (sampler, loss, NaN check, optimizer, LR schedule, progress
callback) with ``TrainConfig(cuda_graphs="off")`` against the default
``"auto"`` (CUDA graphs on one GPU: full batches replay the captured forward and
backward). Same ResNet-18 layout as bench_qat.py (torch.nn, random init).

The data is resident on the model's device (a collate function that hands out
slices of one batch), so the table measures the loop and not an input pipeline.
Each timed run is one ``train()`` call of ``--warmup-steps + --steps`` SGD steps;
its first ``--warmup-steps`` steps (the capture among them) are not timed. Each
step is timed from one progress callback to the next: CUDA events on the GPU
(no extra synchronization: the loop reads its loss every step anyway),
``time.perf_counter`` on the CPU. Variants and loops are interleaved in rounds, so
machine noise hits them alike; min / median / max over all timed steps.

Examples:
    .venv/bin/python benchmarks/bench_qat_loop.py                         # CPU smoke test, tiny sizes
    python3 benchmarks/bench_qat_loop.py --device cuda                    # batch 128, 224x224
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, emit, machine_header, markdown_table, setup_torch  # noqa: E402
from bench_qat import ResNet18, _warm_gpu  # noqa: E402

from quantlab import qat  # noqa: E402
from quantlab.qat.loop import TrainConfig, train  # noqa: E402

LOOPS = {"off": "eager", "auto": "CUDA graphs (auto)"}


class _Indices(Dataset):
    """``size`` samples whose collate hands out slices of one resident batch (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        return i


def resident_loader(x: torch.Tensor, y: torch.Tensor, steps: int) -> DataLoader:
    batch = x.shape[0]

    def collate(indices: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        n = len(indices)
        return x[:n], y[:n]

    return DataLoader(_Indices(batch * steps), batch_size=batch, collate_fn=collate)


class StepClock:
    """Per-step times from the loop's progress callbacks."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: List[Any] = []

    def start(self) -> None:
        self.marks = [self._mark()]

    def __call__(self, progress: Any) -> None:
        self.marks.append(self._mark())

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self) -> List[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 4 on the CPU")
    parser.add_argument("--resolution", type=int, default=None, help="default 224 on CUDA, 32 on the CPU")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3 CUDA, 1 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 25 CUDA, 2 CPU)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed steps at the start of each run, the capture included (default 5 CUDA, 1 CPU)")
    parser.add_argument("--warm-gpu", type=float, default=2.0, help="seconds of matrix products before timing (clocks up)")
    parser.add_argument("--variants", default="fp32,qat,qat-lsq,qat-fold-bn")
    parser.add_argument("--loops", default="off,auto", help="TrainConfig.cuda_graphs values to compare (default off,auto)")
    parser.add_argument("--label", default="", help="a note for the table's title")
    args = parser.parse_args()
    device = setup_torch(args)
    cuda = device.type == "cuda"
    batch = args.batch_size or (128 if cuda else 4)
    res = args.resolution or (224 if cuda else 32)
    rounds = args.rounds or (3 if cuda else 1)
    steps = args.steps or (25 if cuda else 2)
    warmup = args.warmup_steps if args.warmup_steps is not None else (5 if cuda else 1)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    base = ResNet18().to(device)
    calib = [(x[: min(batch, 32)], None)]
    builders: Dict[str, Callable[[], nn.Module]] = {
        "fp32": lambda: copy.deepcopy(base),
        "qat": lambda: qat.prepare(copy.deepcopy(base), data=calib, calibrator="max"),
        "qat-lsq": lambda: qat.prepare(copy.deepcopy(base), data=calib, calibrator="max", learn_amax=True, weight_ranges="learn"),
        # freeze_bn_after=0: the recommended setting for fine-tuning a converged model (qat.prepare's docstring).
        "qat-fold-bn": lambda: qat.prepare(copy.deepcopy(base), data=calib, calibrator="max", fold_bn=True, freeze_bn_after=0),
    }
    labels = {"fp32": "FP32 training", "qat": "QAT (fixed act. ranges, weight ranges recomputed)",
              "qat-lsq": "QAT, learned ranges (LSQ)", "qat-fold-bn": "QAT, BN folded and frozen"}
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    loops = [v.strip() for v in args.loops.split(",") if v.strip()]
    unknown = [n for n in names if n not in builders] + [m for m in loops if m not in ("off", "auto", "on")]
    if unknown:
        raise SystemExit(f"unknown variant(s)/loop(s) {unknown}; variants: {', '.join(builders)}; loops: off, auto, on")
    runs = [(name, mode) for name in names for mode in loops]
    models = {run: builders[run[0]]() for run in runs}
    loader = resident_loader(x, y, warmup + steps)
    _warm_gpu(device, args.warm_gpu)
    times: Dict[Tuple[str, str], List[float]] = {run: [] for run in runs}
    round_medians: Dict[Tuple[str, str], List[float]] = {run: [] for run in runs}
    first_steps: Dict[Tuple[str, str], List[float]] = {run: [] for run in runs}
    reports: Dict[Tuple[str, str], Optional[Dict[str, Any]]] = {}
    for _ in range(rounds):
        for run in runs:
            config = TrainConfig(max_steps=warmup + steps, lr=1e-4, optimizer="sgd", batch_size=batch, shuffle=False,
                                 cuda_graphs=run[1])
            clock = StepClock(device)
            clock.start()
            result = train(models[run], loader, config, progress=clock)
            seconds = clock.seconds()
            first_steps[run].append(seconds[0])
            times[run] += seconds[warmup:]
            round_medians[run].append(statistics.median(seconds[warmup:]))
            reports[run] = result.cuda_graphs
    median = {run: statistics.median(t) for run, t in times.items()}
    reference = median.get(("fp32", "off"))
    rows = []
    for run in runs:
        t = sorted(times[run])
        med = median[run]
        report = reports[run] or {}
        used = f"{report.get('graphed_steps', 0)}/{warmup + steps}"
        if report.get("eager_reason") and report.get("requested") != "off":
            used += f" ({report['eager_reason']})"
        rows.append([
            labels[run[0]], LOOPS.get(run[1], run[1]), t[0] * 1e3, med * 1e3, t[-1] * 1e3, f"{t[-1] / med:.2f}",
            f"{med / reference:.2f}x" if reference else "-",
            f"{median[(run[0], 'off')] / med:.2f}x" if (run[0], "off") in median else "-",
            used, report.get("captures", 0), statistics.median(first_steps[run]) * 1e3,
            ", ".join(f"{m * 1e3:.1f}" for m in round_medians[run]),
        ])
    title = (f"Built-in QAT loop (qat.train) step time, eager vs CUDA graphs, ResNet-18 layout, batch {batch}, "
             f"{res}x{res}, {device.type}" + (f" ({args.label})" if args.label else ""))
    section = machine_header(title, {"rounds": rounds, "timed steps per run": steps, "untimed steps per run": warmup,
                                     "timed steps per row": rounds * steps, "optimizer": "SGD (momentum 0.9)",
                                     "data": "resident on the device"})
    section += "\n" + markdown_table(
        ["variant", "loop", "min ms", "median ms", "max ms", "max/median", "vs FP32 eager (median)",
         "speed-up vs its eager loop", "graphed steps (last run)", "captures (last run)",
         "first step ms (capture incl.)", "per-round medians ms"], rows)
    emit(section, args.append)


if __name__ == "__main__":
    main()
