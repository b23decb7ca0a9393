"""Tests of the ``percentile`` calibrator against numpy.percentile of the raw samples."""
import math

import numpy as np
import pytest
import torch

from quantlab.calibrators import HistogramStats, get_calibrator
from quantlab.calibrators.percentile import percentile_calibrator


from tests.calibrators import reference as R  # noqa: E402  (pytest runs with pythonpath '.')


def _histogram(samples, num_bins=2048):
    x = np.abs(samples)
    amax = float(x.max())
    counts, _ = np.histogram(x, bins=num_bins, range=(0.0, amax))
    return HistogramStats(torch.from_numpy(counts), amax / num_bins, amax), x


def _samples(kind, rng, n=200_000):
    if kind == "uniform":
        return rng.uniform(-3.0, 3.0, n)
    if kind == "gaussian":
        return rng.standard_normal(n)
    if kind == "student_t2":
        return rng.standard_t(2, n)
    if kind == "lognormal":
        return rng.lognormal(0.0, 1.0, n)
    if kind == "relu":
        return np.maximum(rng.standard_normal(n), 0.0)
    raise ValueError(kind)


KINDS = ["uniform", "gaussian", "student_t2", "lognormal", "relu"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [50.0, 99.0, 99.9, 99.99, 99.999, 100.0])
def test_matches_inverted_cdf_percentile_within_one_bin(kind, p):
    # The histogram answer is the right edge of the bin holding the sample at
    # rank ceil(p/100 * n): numpy's "inverted_cdf" sample. It must lie at most
    # one bin above that sample and never below it (beyond float noise from
    # np.histogram's own bin assignment).
    stats, x = _histogram(_samples(kind, np.random.default_rng(7)))
    amax = percentile_calibrator(stats, percentile=p)
    expected = R.percentile_reference(x, p, method="inverted_cdf")
    noise = 1e-9 * stats.amax
    assert expected - noise <= amax <= expected + stats.bin_width + noise
    assert amax <= stats.amax


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "relu"])
@pytest.mark.parametrize("p", [50.0, 90.0, 99.0])
def test_matches_default_numpy_percentile_within_one_bin(kind, p):
    # numpy's default (linear) interpolates between neighbouring samples; away
    # from the extreme tail, where samples are denser than bins, that stays
    # within one bin width of the histogram answer.
    stats, x = _histogram(_samples(kind, np.random.default_rng(11)))
    amax = percentile_calibrator(stats, percentile=p)
    assert abs(amax - R.percentile_reference(x, p, method="linear")) <= stats.bin_width


def test_default_is_99_99():
    stats, _ = _histogram(_samples("gaussian", np.random.default_rng(3)))
    assert percentile_calibrator(stats) == percentile_calibrator(stats, percentile=99.99)
    assert get_calibrator("percentile")(stats, num_bits=8, percentile=99.99) == percentile_calibrator(stats)


@pytest.mark.parametrize("p", [0.001, 50.0, 99.99, 100.0])
def test_all_mass_in_one_bin_gives_its_right_edge(p):
    counts = torch.zeros(256, dtype=torch.int64)
    counts[37] = 1000
    stats = HistogramStats(counts, 0.125, 255.9 * 0.125)
    assert percentile_calibrator(stats, percentile=p) == 38 * 0.125


def test_clamped_to_amax_when_last_edge_lies_beyond_it():
    counts = torch.zeros(100)
    counts[99] = 5.0
    stats = HistogramStats(counts, 1.0, 99.25)  # largest value seen: 99.25 < edge 100
    assert percentile_calibrator(stats, percentile=100.0) == 99.25


def test_100_reaches_last_non_empty_bin():
    counts = torch.tensor([4, 3, 0, 2, 0, 0], dtype=torch.int64)
    stats = HistogramStats(counts, 1.0, 6.0)
    assert percentile_calibrator(stats, percentile=100.0) == 4.0
    # 7 of 9 samples lie in the first two bins: p just above 7/9 needs bin 3.
    assert percentile_calibrator(stats, percentile=100.0 * 7 / 9) == 2.0
    assert percentile_calibrator(stats, percentile=100.0 * 7 / 9 + 1e-6) == 4.0


def test_count_dtype_does_not_matter():
    stats, _ = _histogram(_samples("lognormal", np.random.default_rng(5)))
    results = {
        percentile_calibrator(HistogramStats(stats.counts.to(dtype), stats.bin_width, stats.amax), percentile=99.9)
        for dtype in (torch.int64, torch.int32, torch.float32, torch.float64)
    }
    assert len(results) == 1


@pytest.mark.parametrize("bad", [0.0, -1.0, 100.0001, 1e9, math.nan])
def test_invalid_percentile_is_rejected(bad):
    stats = HistogramStats(torch.ones(16), 0.1, 1.6)
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\]"):
        percentile_calibrator(stats, percentile=bad)


def test_invalid_percentile_is_rejected_even_for_empty_stats():
    with pytest.raises(ValueError):
        percentile_calibrator(HistogramStats(torch.zeros(16), 0.1, 0.0), percentile=0.0)


def test_all_zero_counts_and_zero_amax_give_zero():
    assert percentile_calibrator(HistogramStats(torch.zeros(2048), 0.01, 0.0)) == 0.0
    assert percentile_calibrator(HistogramStats(torch.zeros(2048), 0.01, 1.0)) == 0.0
    assert percentile_calibrator(HistogramStats(torch.zeros(0), 0.01, 0.0)) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_counts_give_the_cpu_answer(kind):
    cpu, _ = _histogram(_samples(kind, np.random.default_rng(6)))
    cuda = HistogramStats(cpu.counts.cuda(), cpu.bin_width, cpu.amax)
    for p in (50.0, 99.99, 100.0):
        assert percentile_calibrator(cuda, percentile=p) == percentile_calibrator(cpu, percentile=p)
