"""Histograms for the batched-calibrator tests: realistic, random and degenerate ones.

Shared by test_many.py (CPU) and test_many_cuda.py (GPU machine), so both compare
the batched path with the per-tensor path on the same cases.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from quantlab.calibrators import HistogramStats, choose_many, get_calibrator


def _samples(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal(n)
    if kind == "student_t2":
        return rng.standard_t(2, n)
    if kind == "lognormal":
        return rng.lognormal(0.0, 1.0, n)
    if kind == "relu":
        return np.maximum(rng.standard_normal(n), 0.0)
    if kind == "uniform":
        return rng.uniform(-1.0, 1.0, n)
    if kind == "bimodal":
        return np.concatenate([rng.normal(0.0, 0.1, n - n // 50), rng.normal(5.0, 0.5, n // 50)])
    raise ValueError(kind)


KINDS = ("gaussian", "student_t2", "lognormal", "relu", "uniform", "bimodal")


def from_samples(kind: str, num_bins: int, seed: int, n: int) -> HistogramStats:
    x = np.abs(_samples(kind, np.random.default_rng(seed), n))
    amax = float(x.max())
    counts, _ = np.histogram(x, bins=num_bins, range=(0.0, amax))
    return HistogramStats(torch.from_numpy(counts.astype(np.int64)), amax / num_bins, amax)


def realistic(count: int, seed: int = 0, low: int = 128, high: int = 4096, samples=(2_000, 200_000)) -> List[HistogramStats]:
    """Histograms of random bin counts (``low..high``) and sample counts, from several distributions."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        n = int(rng.integers(samples[0], samples[1] + 1))
        out.append(from_samples(KINDS[k % len(KINDS)], int(rng.integers(low, high + 1)), int(rng.integers(1 << 30)), n))
    return out


def _stats(counts, bin_width: float = 0.01, amax=None, dtype=torch.int64) -> HistogramStats:
    counts = torch.as_tensor(np.asarray(counts), dtype=dtype)
    if amax is None:
        amax = bin_width * max(1, counts.numel())
    return HistogramStats(counts, bin_width, amax)


def one_bin(num_bins: int, index: int, value: int = 7) -> np.ndarray:
    counts = np.zeros(num_bins, dtype=np.int64)
    counts[index] = value
    return counts


def degenerate() -> Dict[str, HistogramStats]:
    """Edge cases: empty, one bin, short, huge counts, sparse (exact KL ties), float counts."""
    rng = np.random.default_rng(11)
    cases: Dict[str, HistogramStats] = {}
    cases["all zeros"] = _stats(np.zeros(2048, dtype=np.int64))
    cases["amax 0"] = _stats(one_bin(2048, 5), amax=0.0)
    cases["no bins"] = _stats(np.zeros(0, dtype=np.int64), amax=1.0)
    for where in (0, 1, 2, 127, 128, 1000, 2047):
        cases[f"one non-empty bin at {where}"] = _stats(one_bin(2048, where))
    cases["all mass in the last bin"] = _stats(one_bin(3000, 2999, 10**6))
    cases["all bins full but one"] = _stats(np.where(np.arange(2048) == 700, 0, 5))
    cases["all mass in bin 0 and 1"] = _stats(np.array([9, 4] + [0] * 2046))
    for n in (1, 2, 5, 64, 127, 128, 129):
        cases[f"{n} bins"] = _stats(rng.integers(0, 50, n))
    cases["1 bin, start_bin 1"] = _stats(np.array([3]))
    cases["huge counts, total just below 2**53"] = _stats(_huge_below(2048, rng))
    cases["huge counts, total at 2**53"] = _stats(_huge_at(2048))
    cases["huge counts, one bin 2**53 - 1"] = _stats(one_bin(2048, 1500, 2**53 - 1))
    cases["huge counts, two bins over 2**53"] = _stats(np.array([0] * 1000 + [2**53 - 1, 2**52] + [0] * 1046))
    # Few non-empty bins: every threshold whose levels each hold at most one of them scores
    # exactly 0 (p == q), so many candidates tie at 0 and the last one must win.
    for seed in range(4):
        sparse = np.zeros(2048, dtype=np.int64)
        sparse[np.random.default_rng(seed).choice(np.arange(2, 200), size=20, replace=False)] = rng.integers(1, 9, 20)
        cases[f"sparse low bins, exact zero ties {seed}"] = _stats(sparse)
    spread = np.zeros(4096, dtype=np.int64)
    spread[::97] = 3
    cases["evenly spread equal counts (ties)"] = _stats(spread)
    cases["two equal spikes"] = _stats(one_bin(2048, 300, 5) + one_bin(2048, 1800, 5))
    cases["integer float64 counts"] = _stats(rng.integers(0, 100, 2048).astype(np.float64), dtype=torch.float64)
    cases["fractional float counts"] = _stats(rng.uniform(0, 10, 2048), dtype=torch.float64)
    cases["int32 counts"] = _stats(rng.integers(0, 100, 3000), dtype=torch.int32)
    cases["float32 counts"] = _stats(rng.integers(0, 1000, 2500).astype(np.float32), dtype=torch.float32)
    cases["last bin's edge beyond amax"] = HistogramStats(torch.from_numpy(rng.integers(0, 30, 2048)), 0.001, 2.0475)
    cases["tiny bin width"] = _stats(rng.integers(0, 30, 2048), bin_width=1e-300)
    return cases


def _huge_below(num_bins: int, rng: np.random.Generator) -> np.ndarray:
    counts = rng.integers(0, 1000, num_bins).astype(np.int64)
    counts[3] = 2**52
    others = int(counts.sum()) - int(counts[3]) - int(counts[900])
    counts[900] = 2**53 - 1 - 2**52 - others  # total 2**53 - 1
    return counts


def _huge_at(num_bins: int) -> np.ndarray:
    counts = np.zeros(num_bins, dtype=np.int64)
    counts[10], counts[1200], counts[2000] = 2**52, 2**51, 2**51
    return counts


def invalid() -> Dict[str, HistogramStats]:
    """Counts no histogram pass produces: the per-tensor calibrators decide (and may raise)."""
    return {
        "negative count": _stats(np.where(np.arange(2048) == 9, -3, 2)),
        "NaN count": _stats(np.where(np.arange(2048) == 9, np.nan, 2.0), dtype=torch.float64),
    }


# -- comparing the two paths ------------------------------------------------------------------
def bits(x: float) -> str:
    return float(x).hex()  # tells 0.0 from -0.0 and any last-bit difference


def per_tensor(name, stats, **params):
    """Today's path: the per-tensor calibrator once per histogram (an exception is a result too)."""
    fn = get_calibrator(name)
    out = []
    for s in stats:
        try:
            out.append(bits(fn(s, **params)))
        except ValueError as exc:
            out.append(f"ValueError: {exc}")
    return out


def batched(name, stats, **params):
    try:
        return [bits(a) for a in choose_many(name, stats, **params)]
    except ValueError as exc:
        return [f"ValueError: {exc}"]


def assert_same(name, stats, **params):
    want = per_tensor(name, stats, **params)
    got = batched(name, stats, **params)
    if len(got) == 1 and got[0].startswith("ValueError") and len(stats) != 1:
        assert got[0] in want, f"{name} {params}: batched raised {got[0]}, per tensor gave {want}"
        return
    assert got == want, f"{name} {params}: " + "; ".join(
        f"#{i}: {g} vs {w}" for i, (g, w) in enumerate(zip(got, want)) if g != w)
