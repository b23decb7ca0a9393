"""Tests of the vectorized ``entropy`` calibrator against the plain-loop reference."""

import numpy as np
import pytest
import torch

import quantlab.calibrators.entropy as entropy_module
from quantlab.calibrators import HistogramStats, get_calibrator
from quantlab.calibrators.entropy import entropy_calibrator, entropy_divergences, exact_divergences


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
    if kind == "relu":  # half the mass exactly at 0: the spike the bin-0 quirk hides
        return np.maximum(rng.standard_normal(n), 0.0)
    raise ValueError(kind)


def _histogram(kind, num_bins, seed=0, n=100_000):
    x = np.abs(_samples(kind, np.random.default_rng(seed), n))
    amax = float(x.max())
    counts, _ = np.histogram(x, bins=num_bins, range=(0.0, amax))
    return counts, amax / num_bins, amax


def _assert_matches_reference(counts, bin_width, amax, **params):
    """Vectorized amax must equal the loop's; divergences must agree closely."""
    stats = HistogramStats(torch.from_numpy(np.asarray(counts)), bin_width, amax)
    got = entropy_calibrator(stats, **params)
    want, ref_thresholds, ref_div = R.entropy_reference(counts, bin_width, **params)
    thresholds, div = entropy_divergences(stats.counts, **params)
    div = div.numpy()
    np.testing.assert_array_equal(thresholds.numpy(), ref_thresholds)
    np.testing.assert_array_equal(np.isinf(div), np.isinf(ref_div))
    finite = np.isfinite(ref_div)
    np.testing.assert_allclose(div[finite], ref_div[finite], rtol=1e-9, atol=1e-12)
    if got != want:
        # Only a floating-point tie could split them (summation order differs
        # from numpy's): then both picks must be minimal within rounding.
        chosen = int(round(got / bin_width))
        at_got = ref_div[list(ref_thresholds).index(chosen)]
        assert at_got == pytest.approx(ref_div.min(), rel=1e-9, abs=1e-15)
    return got


KINDS = ["uniform", "gaussian", "student_t2", "lognormal", "relu"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_histograms_match_reference(kind, seed):
    counts, w, amax = _histogram(kind, 512, seed)
    _assert_matches_reference(counts, w, amax)


@pytest.mark.parametrize("kind", ["gaussian", "student_t2", "relu"])
@pytest.mark.parametrize(
    "params",
    [
        dict(stride=3),
        dict(stride=7, start_bin=200),
        dict(start_bin=64),  # fewer threshold bins than levels: empty levels occur
        dict(start_bin=300, stride=2),
        dict(num_bits=6),
        dict(num_bits=6, stride=5, start_bin=40),
        dict(num_bits=4, start_bin=16, stride=4),
    ],
)
def test_parameter_variations_match_reference(kind, params):
    counts, w, amax = _histogram(kind, 512, seed=3)
    _assert_matches_reference(counts, w, amax, **params)


def test_full_2048_bin_histogram_matches_reference():
    counts, w, amax = _histogram("gaussian", 2048, seed=42, n=500_000)
    _assert_matches_reference(counts, w, amax)


def test_exact_pass_matches_reference_for_every_candidate():
    # The term-by-term pass alone (used to settle near-minimal candidates).
    counts, w, _ = _histogram("lognormal", 512, seed=9)
    _, thresholds, ref_div = R.entropy_reference(counts, w, stride=2)
    bins = torch.from_numpy(counts).double()
    bins[0] = bins[1]
    div = exact_divergences(bins, torch.from_numpy(thresholds), 128).numpy()
    np.testing.assert_array_equal(np.isinf(div), np.isinf(ref_div))
    finite = np.isfinite(ref_div)
    np.testing.assert_allclose(div[finite], ref_div[finite], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("profile", ["flat_noisy", "decaying"])
def test_mass_ending_sharply_at_bin_1000(profile):
    # Nothing beyond bin 1000 of 2048. Clipping into the data is heavily
    # penalized (all clipped mass piles on one bin), so amax >= 1000 * w; and
    # because empty bins get no q mass, widening a little past the edge is
    # cheap, so the choice lands shortly above it.
    rng = np.random.default_rng(5)
    counts = np.zeros(2048, dtype=np.int64)
    if profile == "flat_noisy":
        counts[:1000] = rng.poisson(500, 1000)
    else:
        counts[:1000] = rng.poisson(2000 * np.exp(-np.arange(1000) / 400.0))
    w = 0.01
    got = _assert_matches_reference(counts, w, 2048 * w, stride=4)
    assert 1000 * w <= got <= 1120 * w


def test_exact_ties_pick_the_last_minimum():
    # Equal counts on every non-empty bin: each level's uniform spread equals p,
    # so every threshold at or past the data has divergence exactly 0. The
    # reference keeps the last of equal minima, i.e. the widest range.
    counts = np.zeros(512, dtype=np.int64)
    counts[:300] = 7
    w = 0.5
    _, div = entropy_divergences(torch.from_numpy(counts))
    assert (div[300 - 128 :] == 0).all()
    assert _assert_matches_reference(counts, w, 512 * w) == 512 * w
    # With a stride that misses bin 512, the last candidate below it wins.
    assert _assert_matches_reference(counts, w, 512 * w, stride=10) == 508 * w


def test_constant_tensor_deviation_from_raw_reference():
    # |x| constant: all mass in the last bin. For every threshold below it the
    # first i bins are empty, so scipy's q is 0/0 = NaN and numpy's argmin
    # picks a NaN (the raw reference answers bin 2047, clipping the value).
    # quantlab scores those thresholds inf and keeps the whole range.
    counts = np.zeros(2048, dtype=np.int64)
    counts[-1] = 1000
    w = 1.0 / 2048
    stats = HistogramStats(torch.from_numpy(counts), w, 1.0)
    assert entropy_calibrator(stats) == 1.0
    assert R.entropy_reference(counts, w, stride=64)[0] == 1.0
    raw = R.entropy_reference(counts[-256:], w, start_bin=128, nan_as_inf=False)[0]
    assert raw == 255 * w  # NaN candidate 255 beats the finite 0 at 256


def test_chunking_does_not_change_the_result(monkeypatch):
    counts, w, amax = _histogram("student_t2", 512, seed=4)
    stats = HistogramStats(torch.from_numpy(counts), w, amax)
    _, full = entropy_divergences(stats.counts)
    expected = entropy_calibrator(stats)
    # Several chunks per pass, whichever device budget applies.
    monkeypatch.setattr(entropy_module, "_CHUNK_ELEMENTS", 10_000)
    monkeypatch.setattr(entropy_module, "_CPU_CHUNK_ELEMENTS", 10_000)
    _, chunked = entropy_divergences(stats.counts)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-15)
    assert entropy_calibrator(stats) == expected


@pytest.mark.parametrize("budget", [1 << 20, 1 << 16])
def test_chunks_are_few_and_bounded(budget):
    # The Python loop runs once per chunk: a handful for 2048 bins.
    widths = list(range(128, 2049))
    for columns in (None, 129):
        spans = entropy_module._chunks(widths, budget, columns=columns)
        assert len(spans) <= 64
        assert spans[0][0] == 0 and spans[-1][1] == len(widths)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        cols = [columns or widths[hi - 1] for _, hi in spans]
        assert all((hi - lo) * c <= budget for (lo, hi), c in zip(spans, cols))
    assert entropy_module._chunks(widths, 1 << 20, columns=129) == [(0, len(widths))]


def test_count_dtype_and_input_are_not_mutated():
    counts, w, amax = _histogram("relu", 512, seed=2)
    original = torch.from_numpy(counts.copy())
    results = set()
    for dtype in (torch.int64, torch.int32, torch.float64):
        tensor = original.to(dtype)
        results.add(entropy_calibrator(HistogramStats(tensor, w, amax)))
        assert torch.equal(tensor, original.to(dtype))  # the bin-0 quirk works on a copy
    assert len(results) == 1


def test_registered_and_reachable_by_name():
    counts, w, amax = _histogram("gaussian", 256, seed=1)
    stats = HistogramStats(torch.from_numpy(counts), w, amax)
    assert get_calibrator("entropy")(stats, num_bits=8) == entropy_calibrator(stats)


def test_edge_cases():
    w = 0.01
    zeros = torch.zeros(2048, dtype=torch.int64)
    assert entropy_calibrator(HistogramStats(zeros, w, 0.0)) == 0.0
    assert entropy_calibrator(HistogramStats(zeros, w, 5.0)) == 0.0
    assert entropy_calibrator(HistogramStats(torch.ones(2048), w, 0.0)) == 0.0
    # Fewer bins than start_bin: no candidate, keep the whole range.
    assert entropy_calibrator(HistogramStats(torch.ones(100), w, 0.995)) == 0.995
    assert entropy_calibrator(HistogramStats(torch.ones(100), w, 0.995), start_bin=50) == 1.0
    # All mass in bin 0 (ignored by the method): keep the whole range.
    only_zero = torch.zeros(2048)
    only_zero[0] = 50
    assert entropy_calibrator(HistogramStats(only_zero, w, 0.004)) == 0.004


@pytest.mark.parametrize("bad", [dict(num_bits=1), dict(start_bin=0), dict(stride=0), dict(num_bits=7.5)])
def test_invalid_parameters(bad):
    with pytest.raises(ValueError):
        entropy_calibrator(HistogramStats(torch.ones(512), 0.01, 5.12), **bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_counts_give_the_cpu_answer(kind):
    counts, w, amax = _histogram(kind, 2048, seed=6)
    cpu = HistogramStats(torch.from_numpy(counts), w, amax)
    cuda = HistogramStats(cpu.counts.cuda(), w, amax)
    assert entropy_calibrator(cuda) == entropy_calibrator(cpu)
    _, div_cuda = entropy_divergences(cuda.counts)
    _, div_cpu = entropy_divergences(cpu.counts)
    assert div_cuda.device.type == "cuda"
    torch.testing.assert_close(div_cuda.cpu(), div_cpu, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ties_and_edge_cases():
    counts = torch.zeros(512, dtype=torch.int64, device="cuda")
    counts[:300] = 7
    assert entropy_calibrator(HistogramStats(counts, 0.5, 256.0)) == 256.0
    assert entropy_calibrator(HistogramStats(torch.zeros(512, device="cuda"), 0.5, 0.0)) == 0.0
