"""Times the vectorized entropy calibrator against the plain-loop reference.

The reference is pytorch-quantization's ``_compute_amax_entropy`` written as a
plain numpy loop (tests/calibrators/reference.py). Both run on one 2048-bin
histogram of |x| for 500k gaussian samples; the median of several runs is
reported as a markdown table, with the machine it ran on.

Usage: python benchmarks/bench_entropy.py [--runs N] [--ref-runs N] [--threads N]
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import platform
import statistics
import time

import numpy as np
import torch

from quantlab.calibrators import HistogramStats
from quantlab.calibrators.entropy import entropy_calibrator, exact_divergences

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_reference():
    path = ROOT / "tests" / "calibrators" / "reference.py"
    spec = importlib.util.spec_from_file_location("quantlab_bench_entropy_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median_seconds(fn, runs, sync=lambda: None):
    fn()  # warm-up: allocations, lazy initialization, CUDA context
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each vectorized variant")
    parser.add_argument("--ref-runs", type=int, default=3, help="runs of the slow reference loop")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    reference = _load_reference()
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(500_000))
    amax = float(x.max())
    counts, _ = np.histogram(x, bins=2048, range=(0.0, amax))
    bin_width = amax / 2048
    stats = HistogramStats(torch.from_numpy(counts), bin_width, amax)

    want = reference.entropy_reference(counts, bin_width)[0]
    rows = []
    t_ref = _median_seconds(lambda: reference.entropy_reference(counts, bin_width), args.ref_runs)
    rows.append(("reference loop (numpy, pytorch-quantization algorithm)", t_ref, want))

    got = entropy_calibrator(stats)
    t_vec = _median_seconds(lambda: entropy_calibrator(stats), args.runs)
    rows.append(("quantlab entropy calibrator (torch, cpu)", t_vec, got))

    # The term-by-term level-matrix pass over every candidate, i.e. what the
    # calibrator would cost without its prefix-sum screening.
    bins = stats.counts.double().clone()
    bins[0] = bins[1]
    thresholds = torch.arange(128, 2049)
    t_exact = _median_seconds(lambda: exact_divergences(bins, thresholds, 128), args.runs)
    rows.append(("level-matrix exact pass on all candidates (torch, cpu)", t_exact, None))

    if torch.cuda.is_available():
        cuda_stats = HistogramStats(stats.counts.cuda(), bin_width, amax)
        got_cuda = entropy_calibrator(cuda_stats)
        t_cuda = _median_seconds(lambda: entropy_calibrator(cuda_stats), args.runs, torch.cuda.synchronize)
        rows.append((f"quantlab entropy calibrator (torch, {torch.cuda.get_device_name()})", t_cuda, got_cuda))

    print(f"machine: {platform.processor() or platform.machine()} ({platform.platform()}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}")
    print("histogram: 2048 bins of |N(0,1)|, 500k samples; candidates 128..2048 (1921)")
    print()
    print("| method | median time | speedup vs reference | amax |")
    print("|---|---:|---:|---:|")
    for name, seconds, result in rows:
        shown = "-" if result is None else f"{result:.6f}" + ("" if result == want else " (MISMATCH)")
        print(f"| {name} | {seconds * 1e3:.2f} ms | {t_ref / seconds:.1f}x | {shown} |")


if __name__ == "__main__":
    main()
