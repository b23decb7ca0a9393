"""Fake quantization against a tiny reference, exactly."""
import pytest
import torch

from quantlab.config import QuantizerSpec
from quantlab.functional import MIN_AMAX, amax_of_weight, fake_quantize, scale_from_amax


def reference_fake_quant(x, amax, num_bits=8, narrow=False, axis=None):
    """Plain reference: round half to even of x * (1/scale), clamp, rescale (float32)."""
    bound = 2 ** (num_bits - 1) - 1
    qmin = -bound if narrow else -bound - 1
    amax = torch.as_tensor(amax, dtype=torch.float32).clamp_min(MIN_AMAX)
    scale = amax / bound
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    inv = 1.0 / scale
    q = torch.round(x * inv).clamp(qmin, bound)  # torch.round is half-to-even
    return q * scale


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("num_bits", [8, 4])
def test_per_tensor_matches_reference_exactly(narrow, num_bits):
    x = torch.randn(1000) * 3
    spec = QuantizerSpec(num_bits=num_bits, narrow_range=narrow)
    amax = torch.tensor(2.5)
    assert torch.equal(fake_quantize(x, amax, spec), reference_fake_quant(x, amax, num_bits, narrow))


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_matches_reference_exactly(axis):
    x = torch.randn(6, 5, 3, 3)
    amax = x.abs().amax(dim=[d for d in range(4) if d != axis]) * 0.8  # some values clip
    spec = QuantizerSpec(narrow_range=True, per_channel=True, axis=axis)
    assert torch.equal(fake_quantize(x, amax, spec), reference_fake_quant(x, amax, narrow=True, axis=axis))


def test_ties_round_half_to_even():
    spec = QuantizerSpec()
    amax = torch.tensor(127.0)  # scale 1: the grid is the integers
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])
    assert fake_quantize(x, amax, spec).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 126.0]


def test_clamping_full_and_narrow_range():
    x = torch.tensor([-1000.0, 1000.0])
    amax = torch.tensor(127.0)
    assert fake_quantize(x, amax, QuantizerSpec(narrow_range=False)).tolist() == [-128.0, 127.0]
    assert fake_quantize(x, amax, QuantizerSpec(narrow_range=True)).tolist() == [-127.0, 127.0]


def test_zero_amax_gives_no_nan():
    x = torch.randn(4, 3, 2, 2)
    out = fake_quantize(x, torch.tensor(0.0), QuantizerSpec())
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 128 * MIN_AMAX / 127 + 1e-30
    amax = torch.tensor([0.0, 1.0, 0.0, 2.0])
    spec = QuantizerSpec(per_channel=True, axis=0)
    w = torch.zeros(4, 3, 2, 2)
    w[1] = torch.randn(3, 2, 2).clamp(-1, 1)
    out = fake_quantize(w, amax, spec)
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(3, 2, 2))


def test_straight_through_gradient_is_clipped():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0], requires_grad=True)
    fake_quantize(x, torch.tensor(2.0), QuantizerSpec()).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_scale_is_amax_over_127():
    spec = QuantizerSpec()
    assert scale_from_amax(torch.tensor(1.27), spec).item() == pytest.approx(0.01)


def test_amax_of_weight_per_channel_axis():
    w = torch.randn(4, 7, 3)
    assert torch.equal(amax_of_weight(w, QuantizerSpec(per_channel=True, axis=0)), w.abs().amax(dim=(1, 2)))
    assert torch.equal(amax_of_weight(w, QuantizerSpec(per_channel=True, axis=1)), w.abs().amax(dim=(0, 2)))
    assert amax_of_weight(w, QuantizerSpec()).item() == w.abs().max().item()


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("narrow", [True, False])
def test_sync_free_per_channel_equals_native_op_bit_for_bit(axis, narrow):
    # The CUDA training path (no zero-point read-back) must be the native op exactly, ties and clamping included.
    from quantlab.functional import _PerChannelFakeQuantize

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 7, generator=g) * 4
    channels = x.shape[axis]
    scale = torch.rand(channels, generator=g) * 0.05 + 1e-3
    x.view(-1)[:20] = (torch.arange(20, dtype=torch.float32) - 10.0 + 0.5) * scale[0]  # exact .5 ties (channel 0 for axis 0)
    x.view(-1)[20] = 1e6  # clamps
    qmin, qmax = (-127 if narrow else -128), 127
    dim = axis % x.dim()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = _PerChannelFakeQuantize.apply(xa, scale, dim, qmin, qmax)
    native = torch.fake_quantize_per_channel_affine(xb, scale, torch.zeros(channels, dtype=torch.int32), dim, qmin, qmax)
    assert torch.equal(ours, native)
    grad = torch.randn(x.shape, generator=g)
    ours.backward(grad)
    native.backward(grad)
    assert torch.equal(xa.grad, xb.grad)
