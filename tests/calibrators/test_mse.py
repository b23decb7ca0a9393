"""Tests of the vectorized ``mse`` calibrator against a brute-force reference."""

import numpy as np
import pytest
import torch

import quantlab.calibrators.mse as mse_module
from quantlab.calibrators import HistogramStats, get_calibrator
from quantlab.calibrators.mse import mse_calibrator, mse_errors


from tests.calibrators import reference as R  # noqa: E402  (pytest runs with pythonpath '.')


def _samples(kind, rng, n=100_000):
    if kind == "uniform":
        return rng.uniform(-1.0, 1.0, n)
    if kind == "gaussian":
        return rng.standard_normal(n)
    if kind == "student_t2":
        return rng.standard_t(2, n)
    if kind == "lognormal":
        return rng.lognormal(0.0, 1.0, n)
    if kind == "relu":
        return np.maximum(rng.standard_normal(n), 0.0)
    raise ValueError(kind)


def _histogram(kind, num_bins, seed=0):
    x = np.abs(_samples(kind, np.random.default_rng(seed)))
    amax = float(x.max())
    counts, _ = np.histogram(x, bins=num_bins, range=(0.0, amax))
    return counts, amax / num_bins, amax


def _assert_matches_reference(counts, bin_width, amax, **params):
    stats = HistogramStats(torch.from_numpy(np.asarray(counts)), bin_width, amax)
    got = mse_calibrator(stats, **params)
    want, ref_candidates, ref_errors = R.mse_reference(counts, bin_width, **params)
    candidates, errors = mse_errors(stats, **params)
    np.testing.assert_allclose(candidates.numpy(), ref_candidates, rtol=1e-15)
    np.testing.assert_allclose(errors.numpy(), ref_errors, rtol=1e-9, atol=1e-300)
    if got != want:  # only a floating-point tie may differ; see test_entropy
        at_got = ref_errors[int(np.argmin(np.abs(ref_candidates - got)))]
        assert at_got == pytest.approx(ref_errors.min(), rel=1e-9)
    return got


KINDS = ["uniform", "gaussian", "student_t2", "lognormal", "relu"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_bins", [512, 2048])
def test_random_histograms_match_reference(kind, num_bins):
    _assert_matches_reference(*_histogram(kind, num_bins, seed=num_bins))


@pytest.mark.parametrize("kind", ["gaussian", "student_t2", "relu"])
@pytest.mark.parametrize(
    "params",
    [
        dict(stride=3),
        dict(stride=7, start_bin=200),
        dict(start_bin=32),
        dict(num_bits=6),
        dict(num_bits=6, stride=5, start_bin=40),
        dict(num_bits=4, start_bin=8),
    ],
)
def test_parameter_variations_match_reference(kind, params):
    _assert_matches_reference(*_histogram(kind, 512, seed=3), **params)


@pytest.mark.parametrize("profile", ["flat", "decaying"])
def test_mass_ending_sharply_at_bin_1000(profile):
    # Clipping into the data costs far more than the finer scale saves, and a
    # wider range only coarsens the grid: the optimum sits at the edge, a few
    # bins below it at most (clipping half-empty last bins is cheap).
    rng = np.random.default_rng(5)
    counts = np.zeros(2048, dtype=np.int64)
    if profile == "flat":
        counts[:1000] = rng.poisson(500, 1000)
    else:
        counts[:1000] = rng.poisson(2000 * np.exp(-np.arange(1000) / 400.0))
    w = 0.01
    got = _assert_matches_reference(counts, w, 2048 * w)
    assert 985 * w <= got <= 1000 * w


def test_ties_pick_the_first_minimum():
    # All mass in bin 0: its centre w/2 is below half a step for every
    # candidate (63.5 / (i + 0.5) < 0.5 for i >= 128), so it always rounds to 0 and
    # every candidate has exactly the same error. The first (smallest) wins.
    counts = np.zeros(512, dtype=np.int64)
    counts[0] = 1000
    w = 0.25
    _, errors = mse_errors(HistogramStats(torch.from_numpy(counts), w, 0.1))
    assert (errors == errors[0]).all()
    assert _assert_matches_reference(counts, w, 0.1) == 128.5 * w
    assert _assert_matches_reference(counts, w, 0.1, start_bin=300, stride=9) == 300.5 * w


def test_chunking_does_not_change_the_result(monkeypatch):
    counts, w, amax = _histogram("lognormal", 512, seed=8)
    stats = HistogramStats(torch.from_numpy(counts), w, amax)
    _, full = mse_errors(stats)
    expected = mse_calibrator(stats)
    monkeypatch.setattr(mse_module, "_CHUNK_ELEMENTS", 10_000)  # several chunks
    monkeypatch.setattr(mse_module, "_CPU_CHUNK_ELEMENTS", 10_000)
    _, chunked = mse_errors(stats)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=0.0)
    assert mse_calibrator(stats) == expected


def test_count_dtype_does_not_matter():
    counts, w, amax = _histogram("relu", 512, seed=2)
    results = {
        mse_calibrator(HistogramStats(torch.from_numpy(counts).to(dtype), w, amax))
        for dtype in (torch.int64, torch.int32, torch.float32, torch.float64)
    }
    assert len(results) == 1


def test_registered_and_reachable_by_name():
    counts, w, amax = _histogram("gaussian", 256, seed=1)
    stats = HistogramStats(torch.from_numpy(counts), w, amax)
    assert get_calibrator("mse")(stats, num_bits=8) == mse_calibrator(stats)


def test_edge_cases():
    w = 0.01
    zeros = torch.zeros(2048, dtype=torch.int64)
    assert mse_calibrator(HistogramStats(zeros, w, 0.0)) == 0.0
    assert mse_calibrator(HistogramStats(zeros, w, 5.0)) == 0.0
    assert mse_calibrator(HistogramStats(torch.ones(2048), w, 0.0)) == 0.0
    # No more bins than start_bin: no candidate, keep the whole range.
    assert mse_calibrator(HistogramStats(torch.ones(100), w, 0.995)) == 0.995
    assert mse_calibrator(HistogramStats(torch.ones(128), w, 1.275)) == 1.275


@pytest.mark.parametrize("bad", [dict(num_bits=1), dict(start_bin=0), dict(stride=0), dict(stride=1.5)])
def test_invalid_parameters(bad):
    with pytest.raises(ValueError):
        mse_calibrator(HistogramStats(torch.ones(512), 0.01, 5.12), **bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_counts_give_the_cpu_answer(kind):
    counts, w, amax = _histogram(kind, 2048, seed=6)
    cpu = HistogramStats(torch.from_numpy(counts), w, amax)
    cuda = HistogramStats(cpu.counts.cuda(), w, amax)
    assert mse_calibrator(cuda) == mse_calibrator(cpu)
    _, errors = mse_errors(cuda)
    assert errors.device.type == "cuda"
    torch.testing.assert_close(errors.cpu(), mse_errors(cpu)[1], rtol=1e-9, atol=0.0)
