"""The batched calibrators on a GPU against the per-tensor ones on the same GPU: the same amax, bit for bit.

Runs only where CUDA is available (the GPU machine; benchmarks/RESULTS.md records the run);
test_many.py makes the same comparisons on the CPU in CI.
"""
import pytest
import torch

from quantlab.calibrators import HistogramStats, choose_many, get_batched_calibrator
from quantlab.calibrators.many import pack_counts

from tests.calibrators import histograms as H  # noqa: E402  (pytest runs with pythonpath '.')
from tests.calibrators.histograms import assert_same, bits, per_tensor  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PARAMS = {
    "max": [{}],
    "percentile": [{}, {"percentile": 99.9}, {"percentile": 100.0}, {"percentile": 50.0}],
    "entropy": [{}, {"num_bits": 4}, {"stride": 7}, {"start_bin": 1, "num_bits": 6}],
    "mse": [{}, {"num_bits": 4}, {"stride": 5}, {"start_bin": 1}],
}
CASES = [pytest.param(n, p, id=f"{n}-{p}") for n, sets in PARAMS.items() for p in sets]


def on_gpu(stats):
    return [HistogramStats(s.counts.cuda(), s.bin_width, s.amax) for s in stats]


@pytest.fixture(scope="module")
def model_like():
    """72 histograms of 2048-4095 bins, as a BERT-base statistics pass leaves them."""
    return on_gpu(H.realistic(72, seed=5, low=2048, high=4095, samples=(20_000, 400_000)))


@pytest.mark.parametrize("name,params", CASES)
def test_model_sized_batch(name, params, model_like):
    assert_same(name, model_like, **params)


@pytest.mark.parametrize("name,params", CASES)
def test_random_lengths_128_to_4096(name, params):
    assert_same(name, on_gpu(H.realistic(48, seed=21, samples=(300, 300_000))), **params)


@pytest.mark.parametrize("name,params", CASES)
def test_degenerate_together_and_alone(name, params):
    cases = {k: on_gpu([v])[0] for k, v in H.degenerate().items()}
    assert_same(name, list(cases.values()), **params)
    for label, stats in cases.items():
        assert_same(name, [stats], **params), label


@pytest.mark.parametrize("name,params", [c for c in CASES if c.values[0] != "max"])
def test_invalid_counts(name, params):
    assert_same(name, on_gpu(list(H.invalid().values())), **params)


@pytest.mark.parametrize("name", ["percentile", "entropy", "mse"])
def test_model_sized_batch_is_decided_by_the_batched_form(name, model_like):
    got = get_batched_calibrator(name)(model_like)
    assert sum(a is None for a in got) <= 1, f"{sum(a is None for a in got)} of {len(got)} left to the per-tensor form"


@pytest.mark.parametrize("name", ["percentile", "entropy", "mse"])
def test_histograms_on_two_devices_in_one_call(name):
    cpu = H.realistic(6, seed=2)
    mixed = [s if i % 2 else on_gpu([s])[0] for i, s in enumerate(cpu)]
    assert [bits(a) for a in choose_many(name, mixed)] == per_tensor(name, mixed)


def test_pack_counts_index_copy_matches_row_copies():
    stats = H.realistic(10, seed=8)
    counts = [s.counts.cuda() for s in stats] + [torch.arange(7, dtype=torch.int32, device="cuda")]
    a = pack_counts(counts, row_copies=False)
    b = pack_counts(counts, row_copies=True)
    assert torch.equal(a, b)
    for row, c in zip(a, counts):
        assert torch.equal(row[: c.numel()], c.to(torch.float64))


def _mse_inputs(stats):
    """The packed rows and candidates ``mse_many`` scores, for the default parameters."""
    from quantlab.calibrators.many import ragged

    bins = pack_counts([s.counts for s in stats])
    width = bins.shape[1]
    used = bins != 0
    most = int(used.sum(dim=1).max())
    centres = torch.zeros(len(stats), most, dtype=torch.float64, device="cuda")
    weights = torch.zeros_like(centres)
    for r, s in enumerate(stats):
        edges = torch.arange(width + 1, dtype=torch.float64, device="cuda") * float(s.bin_width)
        mids = ((edges[:-1] + edges[1:]) / 2)[used[r]]
        centres[r, : mids.numel()] = mids
        weights[r, : mids.numel()] = bins[r][used[r]]
        assert s.num_bins > 128
    counts = [s.num_bins - 128 for s in stats]
    seg, pos = ragged(counts, torch.device("cuda"))
    all_centres = torch.stack([(torch.arange(width, dtype=torch.float64, device="cuda") + 0.5) * float(s.bin_width)
                               for s in stats])
    candidates = all_centres[seg, 128 + pos]
    return centres, weights, used.sum(dim=1), seg, candidates, counts


def test_the_mse_kernel_scores_each_candidate_as_the_torch_ops_do(model_like):
    # Each squared error is the same float (same IEEE operations); only the weighted sums' order
    # differs: the two scores agree within the bound mse_many's tie check uses.
    from quantlab.calibrators.mse_cuda import mse_scores
    from quantlab.calibrators.mse_many import _block_scores

    stats = model_like[:12]
    centres, weights, used, seg, candidates, counts = _mse_inputs(stats)
    fused = mse_scores(centres, weights, used, seg, candidates, 127.0)
    assert fused is not None, "the NVRTC kernel did not compile on this GPU"
    blocks = _block_scores(centres, weights, candidates, counts, used.tolist(), list(range(len(stats))), 127.0,
                           torch.device("cuda"))
    terms = used[seg].double()
    bound = 4.0 * (terms + 1.0) * torch.finfo(torch.float64).eps * blocks.abs()
    assert bool((blocks > 0).any()) and bool(((fused - blocks).abs() <= bound).all())


def test_mse_without_the_kernel_gives_the_same_amax(model_like, monkeypatch):
    import quantlab.calibrators.mse_many as mse_many

    monkeypatch.setattr(mse_many, "mse_scores", lambda *args: None)  # the torch-op blocks on the GPU
    assert_same("mse", model_like)
    assert_same("mse", on_gpu(list(H.invalid().values())))


def test_the_entropy_kernels_score_as_the_torch_ops_do(model_like):
    # Screening: the same formula, the sum over levels in another order: well within the tolerance.
    # Term by term: the same IEEE operations, only q's total and the term sum in another order:
    # the two scores agree within the sum of their error bounds, and agree on inf and exactness.
    from quantlab.calibrators import entropy_cuda
    from quantlab.calibrators.entropy_many import _EPS, _SUM_BOUND, _exact, _screen, prepare_rows

    p = prepare_rows(model_like[:12], 128, 128, 1)
    args = (p.bins, p.cum_b, p.cum_n, p.cum_blogb, p.total, p.log_total, p.seg, p.thresholds, 128)
    fused = entropy_cuda.screen(*args)
    assert fused is not None, "the NVRTC kernel did not compile on this GPU"
    ops = _screen(*args)
    finite = torch.isfinite(ops)
    assert torch.equal(finite, torch.isfinite(fused)) and bool(finite.any())
    assert bool(((fused - ops).abs()[finite] <= p.tol[p.seg][finite]).all())

    near = torch.zeros_like(finite)
    near[::37] = True  # a spread of candidates, good and bad
    scored = entropy_cuda.exact(p.bins, p.cum_b, p.cum_n, p.total, p.seg, p.thresholds, near, 128, _SUM_BOUND * _EPS)
    assert scored is not None
    divergence, bound, exact = scored
    index = torch.nonzero(near)[:, 0]
    want, want_bound, want_exact = _exact(p.bins, p.cum_b, p.total, p.seg[index], p.thresholds[index],
                                          p.thresholds[index].tolist(), 128)
    got, got_bound = divergence[index], bound[index]
    both = torch.isfinite(want)
    assert torch.equal(both, torch.isfinite(got)) and bool(both.any())
    assert bool(((got - want).abs()[both] <= (want_bound + got_bound)[both]).all())
    # The bounds scale with the terms' magnitudes (inf alike where a term is inf).
    assert torch.equal(torch.isinf(got_bound), torch.isinf(want_bound))
    bounded = torch.isfinite(want_bound)
    assert bool(((got_bound - want_bound).abs() <= 1e-6 * want_bound)[bounded].all())
    assert torch.equal(exact[index], want_exact)
    assert bool(torch.isinf(divergence[~near]).all()) and not bool(exact[~near].any())


def test_entropy_without_the_kernels_gives_the_same_amax(model_like, monkeypatch):
    from quantlab.calibrators import entropy_cuda

    monkeypatch.setattr(entropy_cuda, "screen", lambda *args: None)  # the torch-op flow on the GPU
    monkeypatch.setattr(entropy_cuda, "exact", lambda *args: None)
    assert_same("entropy", model_like)
    assert_same("entropy", on_gpu(list(H.degenerate().values()) + list(H.invalid().values())))


# -- block forms: sizes on the device, one read-back (what run_ptq's deferred pass uses) ---------------
@pytest.mark.parametrize("name,params", CASES)
def test_block_forms_on_a_4096_wide_block(name, params, model_like):
    from tests.calibrators.test_block import assert_same_from_block

    assert_same_from_block(name, model_like, 4096, **params)
    assert_same_from_block(name, on_gpu(H.realistic(24, seed=31, low=130, high=4096, samples=(300, 300_000))), 4096,
                           **params)
    cases = list(on_gpu(list(H.degenerate().values()) + list(H.invalid().values())))
    assert_same_from_block(name, cases, 4200, **params)


def test_block_forms_read_nothing_back_before_the_read_back(model_like):
    """With the kernels every block form's work is enqueued only: no device-to-host copy, no op that
    reads a value back (``item``/``_local_scalar_dense``, ``nonzero``) before ``values`` is read."""
    from quantlab.calibrators.many import BlockChoices, block_of

    block = block_of(model_like, 4096)
    torch.cuda.synchronize()
    with torch.autograd.profiler.profile(use_device="cuda") as prof:
        choices = BlockChoices(block, {"percentile": {}, "entropy": {}, "mse": {}, "max": {}})
    copies = [e for e in prof.function_events if "DtoH" in e.name or e.name in ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")]
    assert copies == [], [e.name for e in copies]
    assert choices.values.shape == (len(model_like), 3 + 7 + 4)
    got = choices.settle(choices.values.tolist(), model_like)
    for name in ("percentile", "entropy", "mse", "max"):
        assert [bits(a) for a in got[name]] == per_tensor(name, model_like), name
