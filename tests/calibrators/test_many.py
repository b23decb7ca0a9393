"""The batched calibrators against the per-tensor ones: the same amax, bit for bit (CPU).

test_many_cuda.py runs the same comparisons on a GPU (the GPU machine; CI has none).
"""
import math

import numpy as np
import pytest
import torch

import quantlab.calibrators.base as base_module
import quantlab.calibrators.entropy_many as entropy_many_module
import quantlab.calibrators.mse_many as mse_many_module
from quantlab.calibrators import (
    HistogramStats,
    choose_many,
    get_batched_calibrator,
    get_calibrator,
    register_calibrator,
)
from quantlab.calibrators.many import integer_rows, pack_counts, ragged, spans

from tests.calibrators import histograms as H  # noqa: E402  (pytest runs with pythonpath '.')
from tests.calibrators.histograms import assert_same, batched, bits, per_tensor  # noqa: E402

PARAMS = {
    "max": [{}],
    "percentile": [{}, {"percentile": 99.9}, {"percentile": 100.0}, {"percentile": 50.0}],
    "entropy": [{}, {"num_bits": 4, "stride": 7}, {"start_bin": 1, "num_bits": 6}],
    "mse": [{}, {"num_bits": 4, "stride": 5}, {"start_bin": 1}],
}
CASES = [(name, params) for name, sets in PARAMS.items() for params in sets]
# The CI run: every calibrator with its defaults and one other parameter set; the rest is slow.
FAST = [(name, sets[i]) for name, sets in PARAMS.items() for i in range(min(2, len(sets)))]
ALL = [pytest.param(n, p, id=f"{n}-{p}", marks=() if (n, p) in FAST else pytest.mark.slow) for n, p in CASES]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread (two OpenMP threads on a busy 2-core machine ran 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def realistic():
    return H.realistic(16, seed=3)


@pytest.mark.parametrize("name,params", ALL)
def test_realistic_histograms_of_different_lengths_in_one_batch(name, params, realistic):
    assert_same(name, realistic, **params)


@pytest.mark.slow
@pytest.mark.parametrize("name,params", ALL)
def test_many_more_random_histograms(name, params):
    assert_same(name, H.realistic(64, seed=17, samples=(500, 500_000)), **params)


@pytest.mark.parametrize("name", ["percentile", "entropy", "mse"])
def test_the_batched_forms_decide_realistic_histograms_themselves(name, realistic):
    """The per-tensor fallback is for edge cases: a realistic model's histograms are batched."""
    got = get_batched_calibrator(name)(realistic)
    assert sum(a is None for a in got) <= 1


@pytest.mark.parametrize("name,params", ALL)
def test_degenerate_histograms_together_and_alone(name, params):
    cases = H.degenerate()
    assert_same(name, list(cases.values()) + H.realistic(3, seed=9), **params)
    for label, stats in cases.items():
        want, got = per_tensor(name, [stats], **params), batched(name, [stats], **params)
        assert got == want, f"{name} {params} on {label}: {got} vs {want}"


def test_exact_kl_ties_are_decided_by_the_batched_form():
    """Sparse histograms score exactly 0 at many thresholds: integer q, every term 0, so no fallback."""
    cases = {k: v for k, v in H.degenerate().items() if "exact zero ties" in k or "one non-empty bin at 1000" in k}
    stats = list(cases.values())
    got = get_batched_calibrator("entropy")(stats)
    assert all(a is not None for a in got)
    assert [bits(a) for a in got] == per_tensor("entropy", stats)


@pytest.mark.parametrize("name", ["percentile", "entropy"])
def test_counts_whose_sums_may_round_go_to_the_per_tensor_form(name):
    cases = H.degenerate()
    keys = ["huge counts, total at 2**53", "huge counts, two bins over 2**53", "fractional float counts"]
    got = get_batched_calibrator(name)([cases[k] for k in keys])
    assert got == [None, None, None]
    # Integer counts just below 2**53 are batched (the KL search may still leave a near-tie to it).
    assert get_batched_calibrator(name)([cases["huge counts, one bin 2**53 - 1"]]) != [None]
    assert_same(name, [cases[k] for k in keys] + [cases["huge counts, total just below 2**53"]])


@pytest.mark.parametrize("name,params", [c for c in ALL if c.values[0] != "max"])
def test_invalid_counts_answer_or_raise_as_the_per_tensor_form(name, params):
    cases = H.invalid()
    assert_same(name, list(cases.values()), **params)
    for stats in cases.values():
        assert batched(name, [stats], **params) == per_tensor(name, [stats], **params)


@pytest.mark.parametrize("module", [entropy_many_module, mse_many_module], ids=["entropy", "mse"])
def test_when_rounding_could_decide_the_per_tensor_form_does(module, monkeypatch):
    """With an infinite error bound (and every KL candidate near) each search is in doubt:
    all are left to the per-tensor form, with the same result."""
    name = "entropy" if module is entropy_many_module else "mse"
    stats = H.realistic(5, seed=4, low=200, high=400)
    monkeypatch.setattr(module, "_SUM_BOUND", math.inf)
    if module is entropy_many_module:
        monkeypatch.setattr(module, "_NEAR", 1e300)
    assert get_batched_calibrator(name)(stats) == [None] * 5
    assert_same(name, stats)


def _kernel_flow_by_torch_ops(monkeypatch):
    """entropy_cuda's two kernels as the torch ops compute them: entropy_many then takes its GPU flow
    (every candidate scored, inf outside the near set, one read-back) on the CPU."""
    from quantlab.calibrators import entropy_cuda

    def exact(bins, cum_b, cum_n, total, seg, thresholds, near, levels, sum_bound):
        divergence = torch.full(thresholds.shape, math.inf, dtype=torch.float64)
        bound = torch.zeros_like(divergence)
        is_exact = torch.zeros(thresholds.shape, dtype=torch.bool)
        index = torch.nonzero(near)[:, 0]
        if index.numel():
            divergence[index], bound[index], is_exact[index] = entropy_many_module._exact(
                bins, cum_b, total, seg[index], thresholds[index], thresholds[index].tolist(), levels)
        return divergence, bound, is_exact

    monkeypatch.setattr(entropy_cuda, "screen", entropy_many_module._screen)
    monkeypatch.setattr(entropy_cuda, "exact", exact)


def _mse_kernel_by_torch_ops(monkeypatch):
    """mse_cuda's kernel as torch ops (each candidate's weighted squared error over its row's used
    bins): mse_many then takes its GPU flow (every row scored, one read-back) on the CPU."""
    from quantlab.calibrators import mse_cuda

    def scores(c_used, w_used, used, row_of, candidates, qmax):
        out = torch.empty(candidates.numel(), dtype=torch.float64)
        columns = torch.arange(c_used.shape[1])[None, :]
        for lo in range(0, candidates.numel(), 128):
            rows = row_of[lo:lo + 128]
            c, w = c_used[rows], w_used[rows] * (columns < used[rows][:, None])
            scale = (candidates[lo:lo + 128] / qmax)[:, None]
            fq = (c / scale).round_().clamp_(max=qmax).mul_(scale)
            out[lo:lo + 128] = ((c - fq) ** 2 * w).sum(dim=1)
        return torch.where(torch.isnan(candidates), math.inf, out)  # the kernel scores a NaN (absent) candidate inf

    monkeypatch.setattr(mse_cuda, "available", lambda device: True)
    monkeypatch.setattr(mse_many_module, "mse_scores", scores)


@pytest.mark.parametrize("params", PARAMS["mse"], ids=str)
def test_mse_gpu_flow_gives_the_same_amax(params, monkeypatch):
    _mse_kernel_by_torch_ops(monkeypatch)
    stats = H.realistic(6, seed=11, low=150, high=1500)
    assert_same("mse", stats, **params)
    assert_same("mse", list(H.degenerate().values()) + list(H.invalid().values()), **params)
    assert all(a is not None for a in get_batched_calibrator("mse")(stats, **params))


def test_mse_gpu_flow_without_candidates_or_kernel_falls_back(monkeypatch):
    _mse_kernel_by_torch_ops(monkeypatch)
    monkeypatch.setattr(mse_many_module, "mse_scores", lambda *args: None)  # e.g. too many candidates for it
    assert_same("mse", H.realistic(4, seed=12, low=150, high=600))
    few_bins = H.realistic(3, seed=13, low=20, high=100)  # no candidate at all (start_bin 128)
    assert_same("mse", few_bins)


@pytest.mark.parametrize("params", PARAMS["entropy"], ids=str)
def test_entropy_gpu_flow_gives_the_same_amax(params, monkeypatch, realistic):
    _kernel_flow_by_torch_ops(monkeypatch)
    assert_same("entropy", realistic, **params)
    assert_same("entropy", list(H.degenerate().values()) + list(H.invalid().values()), **params)
    for label, stats in H.degenerate().items():
        assert batched("entropy", [stats], **params) == per_tensor("entropy", [stats], **params), label


def test_entropy_gpu_flow_leaves_doubtful_searches_to_the_per_tensor_form(monkeypatch):
    _kernel_flow_by_torch_ops(monkeypatch)
    stats = H.realistic(5, seed=4, low=200, high=400)
    assert all(a is not None for a in get_batched_calibrator("entropy")(stats))
    monkeypatch.setattr(entropy_many_module, "_SUM_BOUND", math.inf)
    monkeypatch.setattr(entropy_many_module, "_NEAR", 1e300)
    assert get_batched_calibrator("entropy")(stats) == [None] * 5
    assert_same("entropy", stats)


@pytest.mark.parametrize("name", ["max", "percentile", "entropy", "mse"])
def test_bad_parameters_raise_like_the_per_tensor_form(name, realistic):
    bad = {"max": {"num_bits": 8, "unknown": 1}, "percentile": {"percentile": 0.0},
           "entropy": {"start_bin": 0}, "mse": {"stride": 0}}[name]
    with pytest.raises((ValueError, TypeError)) as per:
        get_calibrator(name)(realistic[0], **bad)
    with pytest.raises(per.type, match=str(per.value)[:20].replace("(", r"\(").replace(")", r"\)")):
        choose_many(name, realistic[:3], **bad)
    assert choose_many(name, [], **{k: v for k, v in bad.items() if k != "unknown"}) == []


def test_a_calibrator_without_a_batched_form_runs_per_tensor(realistic):
    name = "test-many-half-max"

    def half_max(stats: HistogramStats, *, num_bits: int = 8, factor: float = 0.5) -> float:
        return float(stats.amax) * factor

    register_calibrator(name)(half_max)
    try:  # registered only for this test: other tests run "all" calibrators
        assert get_batched_calibrator(name) is None
        got = choose_many(name, realistic[:4], factor=0.25)
        assert got == [float(s.amax) * 0.25 for s in realistic[:4]]
    finally:
        base_module._REGISTRY.pop(name, None)


def test_pack_counts_both_ways_convert_exactly_as_to_float64():
    rng = np.random.default_rng(0)
    counts = [torch.from_numpy(rng.integers(0, 2**40, 300)), torch.tensor([2**53 + 1, 3], dtype=torch.int64),
              torch.from_numpy(rng.integers(0, 2**20, 17).astype(np.int32)),
              torch.from_numpy(rng.integers(0, 2**20, 40).astype(np.float32)), torch.zeros(1, dtype=torch.int64)]
    for row_copies in (True, False):
        packed = pack_counts(counts, row_copies=row_copies)
        assert packed.shape == (5, 300) and packed.dtype == torch.float64
        for row, c in zip(packed, counts):
            assert torch.equal(row[: c.numel()], c.to(torch.float64))
            assert not row[c.numel():].any()
    same = [torch.arange(5), torch.arange(5) * 2]
    assert torch.equal(pack_counts(same), torch.stack(same).double())


def test_ragged_rows_with_empty_ones():
    for lengths in ([3, 0, 2], [0, 0, 4, 1], [5], [2, 0, 0], [0, 3, 0]):
        row, position = ragged(lengths, torch.device("cpu"))
        want_row = [r for r, n in enumerate(lengths) for _ in range(n)]
        want_pos = [p for n in lengths for p in range(n)]
        assert row.tolist() == want_row and position.tolist() == want_pos


def test_integer_rows_test_is_exact_at_2_pow_53():
    rows = torch.tensor([[2.0**53 - 1, 0.0], [2.0**53 - 2, 1.0], [2.0**53 - 2, 2.0], [1.5, 0.0], [-1.0, 2.0], [math.nan, 0.0]],
                        dtype=torch.float64)
    assert integer_rows(rows).tolist() == [True, True, False, False, False, False]


def test_spans_stay_within_the_budget():
    columns = [9, 9, 7, 5, 5, 5, 3, 1]
    chunks = spans(columns, 15)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(columns)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all((hi - lo) * columns[lo] <= 15 or hi - lo == 1 for lo, hi in chunks)


def test_packing_again_reuses_the_matrix_until_a_count_changes():
    stats = H.realistic(5, seed=14)
    counts = [s.counts for s in stats]
    first = pack_counts(counts, row_copies=False)
    assert pack_counts(counts, row_copies=False) is first
    assert pack_counts(counts, row_copies=True) is not first  # another way of packing: packed again
    counts[2][0] += 1  # a change in place: its version moves on
    again = pack_counts(counts, row_copies=False)
    assert again is not first and again[2, 0] == first[2, 0] + 1
    assert pack_counts([c.clone() for c in counts], row_copies=False) is not again  # other tensors, same values
    with torch.inference_mode():
        frozen = [c.clone() for c in counts]
    assert torch.equal(pack_counts(frozen), pack_counts(frozen))  # inference tensors: never cached, still right
    assert_same("percentile", [HistogramStats(c, s.bin_width, s.amax) for c, s in zip(frozen, stats)])


def test_mse_rows_left_out_of_the_search_do_not_spill_into_the_others():
    """Rows that need no search (too few bins, or invalid counts) may use more bins than any searched
    row: only the searched rows are compacted, so the others cannot overwrite them (a regression:
    the torch-op path once raised an index error or chose another row's amax)."""
    few_bins_all_used = H._stats(np.arange(1, 101))  # 100 bins, all used, no search (start_bin 128)
    sparse = np.zeros(200, dtype=np.int64)
    sparse[[3, 9, 50, 77, 120, 130, 150, 170, 180, 199]] = [5, 1, 9, 2, 7, 1, 3, 8, 2, 6]
    half = np.zeros(100, dtype=np.int64)
    half[::2] = np.arange(1, 51)
    cases = [
        [few_bins_all_used, H._stats(sparse)],
        [H._stats(half), H._stats(sparse[:150]), H._stats(np.r_[sparse, np.zeros(40, dtype=np.int64)])],
        [H._stats(np.r_[np.arange(1, 101), [-1]]), H._stats(sparse)],  # an invalid row with many used bins
    ]
    for stats in cases:
        assert_same("mse", stats)
        assert_same("mse", stats, start_bin=50)
