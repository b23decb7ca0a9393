"""The quantizer's range setting for many quantizers at once (quantize_all_with)."""
import math

import pytest
import torch

from quantlab.config import QuantizerSpec
from quantlab.errors import CalibrationError
from quantlab.tensor_quantizer import QuantizerMode, TensorQuantizer, quantize_all_with


def quantizers(n, channels=None):
    spec = QuantizerSpec(per_channel=True, axis=0) if channels else QuantizerSpec()
    return [TensorQuantizer(spec, role="input", name=f"q{i}", channels=channels) for i in range(n)]


def test_many_ranges_are_stored_as_one_at_a_time_stores_them():
    values = [1 / 3, 2.0, 1e-30, 3e38, 0.1]
    together, alone = quantizers(5), quantizers(5)
    quantize_all_with(together, values)
    for q, v in zip(alone, values):
        q.quantize_with(v)
    for a, b in zip(together, alone):
        assert a.mode is b.mode is QuantizerMode.QUANTIZE
        assert a.amax.item() == b.amax.item() and a.amax._version > 0
    assert together[0].amax.item() != 1 / 3  # float32, as the buffer holds it


def test_a_scale_cached_before_is_not_reused_after():
    q = quantizers(2)
    quantize_all_with(q, [1.0, 1.0])
    before = q[0].fixed_scale().item()
    quantize_all_with(q, [2.0, 2.0])
    assert q[0].fixed_scale().item() == pytest.approx(2 * before)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_range_raises_before_anything_is_stored(bad):
    q = quantizers(3)
    with pytest.raises(CalibrationError, match="q1"):
        quantize_all_with(q, [1.0, bad, 2.0])
    assert all(x.mode is QuantizerMode.OFF and math.isnan(x.amax.item()) for x in q)


def test_per_channel_quantizers_take_the_one_at_a_time_path():
    q = quantizers(2, channels=3)
    with pytest.raises(ValueError, match="shape"):  # a scalar for a per-channel buffer: set_amax's own check
        quantize_all_with(q, [1.0, 2.0])


def test_store_ranges_copies_matching_tensors_and_sets_the_rest():
    from quantlab.tensor_quantizer import store_ranges

    per_channel = quantizers(2, channels=3)
    scalar = quantizers(1)
    ranges = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64), 7.5]
    before = [q.amax._version for q in per_channel]
    store_ranges(per_channel + scalar, ranges)
    assert per_channel[0].amax.tolist() == [1.0, 2.0, 3.0] and per_channel[0].amax._version > before[0]
    assert per_channel[1].amax.tolist() == [4.0, 5.0, 6.0] and per_channel[1].amax.dtype == torch.float32
    assert scalar[0].amax.item() == 7.5
    with pytest.raises(ValueError, match="shape"):
        store_ranges(per_channel[:1], [torch.ones(4)])


def test_quantize_all_with_returns_what_the_buffers_hold():
    q = quantizers(3)
    held = quantize_all_with(q, [1 / 3, 2.0, 0.1])
    assert held == [x.amax.item() for x in q] and held[0] != 1 / 3
