"""Tests of the ``max`` calibrator and of the calibrator registry."""
import math

import pytest
import torch

from quantlab.calibrators import (
    HistogramStats,
    UnknownCalibratorError,
    get_calibrator,
    list_calibrators,
)
from quantlab.calibrators.max import max_calibrator


def _stats(counts, bin_width=0.5, amax=3.25):
    return HistogramStats(torch.as_tensor(counts), bin_width, amax)


def test_returns_running_max_as_python_float():
    amax = max_calibrator(_stats([3, 0, 1, 0, 0, 0, 2], amax=3.25))
    assert amax == 3.25
    assert type(amax) is float


def test_ignores_histogram_including_empty_counts():
    # A max-only collector may not build a histogram at all.
    assert max_calibrator(_stats(torch.zeros(0), bin_width=1.0, amax=7.0)) == 7.0


def test_num_bits_does_not_matter():
    stats = _stats([1, 2, 3], amax=1.5)
    assert max_calibrator(stats, num_bits=4) == max_calibrator(stats, num_bits=8) == 1.5


def test_zero_amax_gives_zero():
    assert max_calibrator(_stats([0, 0, 0], amax=0.0)) == 0.0


def test_tensor_amax_is_converted():
    # amax may arrive as a 0-d tensor from a collector; the result is still a float.
    amax = max_calibrator(HistogramStats(torch.ones(4), 0.25, torch.tensor(0.75)))
    assert type(amax) is float and math.isclose(amax, 0.75)


# --- registry (calibrators/base.py) -------------------------------------------


def test_builtin_calibrators_are_registered():
    assert {"max", "percentile", "entropy", "mse"} <= set(list_calibrators())
    assert get_calibrator("max") is max_calibrator
    assert get_calibrator("MAX") is max_calibrator


def test_unknown_calibrator_error_lists_registered_names():
    with pytest.raises(UnknownCalibratorError) as info:
        get_calibrator("kl-magic")
    message = str(info.value)
    assert "kl-magic" in message
    for name in ("entropy", "max", "mse", "percentile"):
        assert name in message
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize("name", ["max", "percentile", "entropy", "mse"])
def test_every_calibrator_returns_float_and_handles_all_zero(name):
    calibrate = get_calibrator(name)
    zeros = HistogramStats(torch.zeros(512, dtype=torch.int64), 0.01, 0.0)
    result = calibrate(zeros)
    assert type(result) is float and result == 0.0
    counts = torch.zeros(512, dtype=torch.int64)
    counts[:300] = 5
    result = calibrate(HistogramStats(counts, 0.01, 3.0))
    assert type(result) is float and 0.0 < result <= 512 * 0.01
