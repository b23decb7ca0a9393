"""The calibrators' block forms (histograms whose sizes stay on the device until one read-back)
against the per-tensor calibrators: the same amax, bit for bit (CPU; the kernels' flows by torch ops).

test_many_cuda.py runs them on a GPU with the kernels.
"""
import math

import pytest
import torch

from quantlab.calibrators import HistogramStats, get_block_calibrator, register_calibrator
from quantlab.calibrators import base as base_module
from quantlab.calibrators.many import BlockChoices, block_of

from tests.calibrators import histograms as H  # noqa: E402
from tests.calibrators.histograms import bits, per_tensor  # noqa: E402
from tests.calibrators.test_many import ALL, _kernel_flow_by_torch_ops, _mse_kernel_by_torch_ops, _one_thread  # noqa: E402,F401


def from_block(name, stats, width=None, **params):
    """The block path: enqueue on a block of ``stats``, read back once, settle."""
    choices = BlockChoices(block_of(stats, width), {name: params})
    read = choices.values.tolist()
    assert len(read) == len(stats)
    try:
        return [bits(a) for a in choices.settle(read, stats)[name]]
    except ValueError as exc:
        return [f"ValueError: {exc}"]


def assert_same_from_block(name, stats, width=None, **params):
    want = per_tensor(name, stats, **params)
    got = from_block(name, stats, width, **params)
    if len(got) == 1 and got[0].startswith("ValueError") and len(stats) != 1:
        assert got[0] in want, f"{name} {params}: the block path raised {got[0]}, per tensor gave {want}"
        return
    assert got == want, f"{name} {params} width {width}: " + "; ".join(
        f"#{i}: {g} vs {w}" for i, (g, w) in enumerate(zip(got, want)) if g != w)


@pytest.fixture(params=["torch ops", "kernel flows"])
def flow(request, monkeypatch):
    """The CPU's torch-op forms, or the GPU kernels' flows (every candidate scored, one read-back) by torch ops."""
    if request.param == "kernel flows":
        _kernel_flow_by_torch_ops(monkeypatch)
        _mse_kernel_by_torch_ops(monkeypatch)
    return request.param


@pytest.mark.parametrize("name,params", ALL)
def test_realistic_histograms_padded_to_any_width(name, params, flow):
    stats = H.realistic(8, seed=21, low=100, high=1500)
    for width in (None, 1600, 2100):
        assert_same_from_block(name, stats, width, **params)


@pytest.mark.parametrize("name,params", ALL)
def test_degenerate_and_invalid_histograms(name, params, flow):
    cases = list(H.degenerate().values()) + list(H.invalid().values())
    assert_same_from_block(name, cases, 4200, **params)
    for stats in cases[:12]:  # alone too: a block of one row
        assert_same_from_block(name, [stats], None, **params)


def test_candidates_past_a_rows_bins_are_absent(flow):
    """A short row beside a long one: the long row's width gives the short one candidates past its
    own bins; they must never be chosen (they would clip nothing: a different amax)."""
    short = H.realistic(1, seed=5, low=140, high=160)[0]
    long = H.realistic(1, seed=6, low=3000, high=3100)[0]
    for name in ("percentile", "entropy", "mse"):
        assert_same_from_block(name, [short, long], 4096)
        assert_same_from_block(name, [long, short], 4096)


def test_rows_without_statistics_answer_zero():
    stats = H.realistic(3, seed=7, low=200, high=300)
    choices = BlockChoices(block_of(stats), {"entropy": {}, "max": {}})
    got = choices.settle(choices.values.tolist(), [stats[0], None, stats[2]])
    assert got["entropy"][1] == 0.0 and got["max"][1] == 0.0
    assert got["max"][0] == float(stats[0].amax) and got["entropy"][0] > 0


def test_every_calibrator_from_one_read_back_in_its_own_columns(monkeypatch):
    _kernel_flow_by_torch_ops(monkeypatch)  # the kernels' flows read nothing back before settle
    _mse_kernel_by_torch_ops(monkeypatch)
    stats = H.realistic(6, seed=8, low=200, high=900)
    wanted = {"percentile": {"percentile": 99.9}, "mse": {}, "entropy": {}, "max": {}}
    choices = BlockChoices(block_of(stats), wanted)
    assert choices.values.shape == (6, 3 + 4 + 7)  # max has no block form: nothing to read
    got = choices.settle(choices.values.tolist(), stats)
    assert list(got) == list(wanted)
    for name, params in wanted.items():
        assert [bits(a) for a in got[name]] == per_tensor(name, stats, **params), name


def test_a_calibrator_without_a_block_form_runs_on_the_histograms(monkeypatch):
    monkeypatch.setattr(base_module, "_REGISTRY", dict(base_module._REGISTRY))
    register_calibrator("half-max")(lambda stats, *, num_bits=8: float(stats.amax) / 2)
    assert get_block_calibrator("half-max") is None
    stats = H.realistic(3, seed=9)
    choices = BlockChoices(block_of(stats), {"half-max": {}})
    assert choices.settle(choices.values.tolist(), stats)["half-max"] == [float(s.amax) / 2 for s in stats]


@pytest.mark.parametrize("name,bad", [("percentile", {"percentile": 0.0}), ("entropy", {"start_bin": 0}),
                                      ("mse", {"stride": 0}), ("entropy", {"unknown": 1}), ("max", {"unknown": 1})])
def test_bad_parameters_raise_before_any_work_like_the_per_tensor_form(name, bad):
    stats = H.realistic(2, seed=10)
    from quantlab.calibrators import get_calibrator

    with pytest.raises((ValueError, TypeError)) as per:
        get_calibrator(name)(stats[0], **bad)
    with pytest.raises(per.type) as block:
        BlockChoices(block_of(stats), {name: bad}).settle([[]] * 2, stats)
    assert str(block.value) == str(per.value)


def test_block_of_pads_and_keeps_sizes_on_the_device():
    stats = [HistogramStats(torch.tensor([1, 2, 3]), 0.5, 1.4), HistogramStats(torch.zeros(0, dtype=torch.int64), 1.0, 0.0)]
    block = block_of(stats, 5)
    assert block.counts.shape == (2, 5) and block.counts.dtype == torch.float64
    assert block.counts[0].tolist() == [1, 2, 3, 0, 0] and block.counts[1].tolist() == [0] * 5
    assert block.num_bins.tolist() == [3, 0] and block.bin_width.tolist() == [0.5, 1.0]
    assert math.isfinite(float(block.bin_width.sum()))
