"""STE and LSQ gradients against hand-written references, per-tensor and per-channel."""
import math

import pytest
import torch

from quantlab.config import QuantizerSpec
from quantlab.functional import fake_quantize
from quantlab.qat.learnable import lsq_fake_quantize, lsq_grad_factor

ACT = QuantizerSpec(num_bits=8, narrow_range=False)  # [-128, 127]
WEIGHT_PC = QuantizerSpec(num_bits=8, narrow_range=True, per_channel=True, axis=0)  # [-127, 127] per row


UNITS = [0.0, 0.3, -0.5, 0.5, 1.5, 126.4, 127.0, 127.49, 127.5, 127.51, 200.0,
         -127.0, -127.49, -127.5, -128.0, -128.49, -128.5, -128.51, -300.0]


def _boundary_values(amax: float, spec: QuantizerSpec) -> torch.Tensor:
    """Values at and around the clipping boundaries, in units of the step."""
    s = amax / spec.bound
    return torch.tensor([u * s for u in UNITS], dtype=torch.float32)


def _reference(x: torch.Tensor, amax: torch.Tensor, spec: QuantizerSpec, upstream: torch.Tensor):
    """Element by element in Python: clipped STE for x, LSQ formula for amax."""
    x2 = x if spec.axis is not None else x.reshape(1, -1)
    up2 = upstream if spec.axis is not None else upstream.reshape(1, -1)
    amaxes = amax.reshape(-1).tolist()
    grad_x = torch.zeros_like(x2)
    grad_amax = []
    for c, a in enumerate(amaxes):
        scale = torch.tensor(a / spec.bound, dtype=torch.float32)
        inv = 1.0 / scale  # float32, like the kernel
        total = 0.0
        n = x2[c].numel()
        g = 1.0 / math.sqrt(n * spec.quant_max)
        for i in range(n):
            v = float(x2[c, i] * inv)
            q = float(torch.round(torch.tensor(v)))  # half to even
            inside = spec.quant_min <= q <= spec.quant_max
            grad_x[c, i] = up2[c, i] if inside else 0.0
            d = (q - v) if inside else (spec.quant_min if q < spec.quant_min else spec.quant_max)
            total += float(up2[c, i]) * d
        grad_amax.append(total * g / spec.bound)
    return grad_x.reshape(x.shape), torch.tensor(grad_amax, dtype=torch.float64).reshape(amax.shape)


@pytest.mark.parametrize("spec", [ACT, QuantizerSpec(num_bits=8, narrow_range=True)], ids=["act", "weight-narrow"])
def test_per_tensor_ste_and_lsq_match_reference(spec):
    amax = torch.tensor(2.54, requires_grad=True)
    x = _boundary_values(2.54, spec).requires_grad_(True)
    upstream = torch.linspace(0.5, 2.0, x.numel()) * torch.tensor([1.0, -1.0]).repeat(10)[: x.numel()]
    out = lsq_fake_quantize(x, amax, spec)
    out.backward(upstream)
    ref_gx, ref_ga = _reference(x.detach(), amax.detach(), spec, upstream)
    assert torch.equal(out.detach(), fake_quantize(x.detach(), amax.detach(), spec))
    assert torch.equal(x.grad, ref_gx)
    assert amax.grad.item() == pytest.approx(ref_ga.item(), rel=1e-5, abs=1e-7)
    # The boundaries themselves: +-amax is on the grid; 127.5 steps rounds to 128 (clipped).
    passes = [u for u, g in zip(UNITS, (x.grad != 0).tolist()) if g]
    assert 127.0 in passes and -127.0 in passes and 127.49 in passes
    assert 127.5 not in passes and 200.0 not in passes and -300.0 not in passes
    if spec.narrow_range:
        assert -127.5 not in passes and -128.0 not in passes
    else:
        assert -128.0 in passes and -128.5 in passes  # half-to-even: -128.5 -> -128, still on the grid
        assert -128.51 not in passes


def test_plain_fake_quantize_ste_equals_reference():
    """The fixed-range path (core fake_quantize) has the same clipped STE."""
    amax = torch.tensor(1.27)
    x = _boundary_values(1.27, ACT).requires_grad_(True)
    upstream = torch.rand(x.numel()) + 0.5
    fake_quantize(x, amax, ACT).backward(upstream)
    ref_gx, _ = _reference(x.detach(), amax, ACT, upstream)
    assert torch.equal(x.grad, ref_gx)


def test_per_channel_ste_and_lsq_match_reference():
    amax = torch.tensor([0.5, 1.0, 3.0], requires_grad=True)
    torch.manual_seed(1)
    x = torch.randn(3, 40) * torch.tensor([[0.4], [1.2], [1.0]])
    x[0, :4] = torch.tensor([0.5, -0.5, 0.5 * 127.5 / 127, -0.5 * 127.5 / 127])  # boundaries of channel 0
    x.requires_grad_(True)
    upstream = torch.randn(3, 40)
    out = lsq_fake_quantize(x, amax, WEIGHT_PC)
    out.backward(upstream)
    ref_gx, ref_ga = _reference(x.detach(), amax.detach(), WEIGHT_PC, upstream)
    assert torch.equal(out.detach(), fake_quantize(x.detach(), amax.detach(), WEIGHT_PC))
    assert torch.equal(x.grad, ref_gx)
    assert torch.allclose(amax.grad.double(), ref_ga, rtol=1e-5, atol=1e-8)
    assert x.grad[0, :2].tolist() == upstream[0, :2].tolist()  # +-amax pass
    assert x.grad[0, 2:4].tolist() == [0.0, 0.0]  # 127.5 steps: clipped
    assert (x.grad[1] == 0).any(), "channel 1 (range 1.0, values up to ~3.6) must clip some values"


def test_lsq_matches_pytorch_learnable_op():
    """Same gradients as torch._fake_quantize_learnable_per_tensor/per_channel_affine."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5) * 2
    up = torch.randn_like(x)
    # per tensor
    amax = torch.tensor(3.0, requires_grad=True)
    xa = x.clone().requires_grad_(True)
    lsq_fake_quantize(xa, amax, ACT).backward(up)
    scale = torch.tensor([3.0 / 127], requires_grad=True)
    xb = x.clone().requires_grad_(True)
    g = lsq_grad_factor(x, ACT)
    torch._fake_quantize_learnable_per_tensor_affine(xb, scale, torch.zeros(1), -128, 127, g).backward(up)
    assert torch.equal(xa.grad, xb.grad)
    assert amax.grad.item() == pytest.approx(scale.grad.item() / 127, rel=1e-4)
    # per channel (axis 1)
    spec = QuantizerSpec(num_bits=8, narrow_range=True, per_channel=True, axis=1)
    amax_c = (torch.rand(8) + 1.0).requires_grad_(True)
    xa = x.clone().requires_grad_(True)
    lsq_fake_quantize(xa, amax_c, spec).backward(up)
    scale_c = (amax_c.detach() / 127).requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    g = lsq_grad_factor(x, spec)
    assert g == pytest.approx(1 / math.sqrt(20 * 127))
    torch._fake_quantize_learnable_per_channel_affine(xb, scale_c, torch.zeros(8), 1, -127, 127, g).backward(up)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.allclose(amax_c.grad, scale_c.grad / 127, rtol=1e-4, atol=1e-7)


def test_grad_factor_is_lsq_scaling():
    x = torch.zeros(16, 3, 3, 3)
    assert lsq_grad_factor(x, ACT) == pytest.approx(1 / math.sqrt(x.numel() * 127))
    assert lsq_grad_factor(x, WEIGHT_PC) == pytest.approx(1 / math.sqrt(27 * 127))


def test_amax_below_minimum_gets_no_gradient_and_half_precision_works():
    amax = torch.tensor(0.0, requires_grad=True)
    x = torch.randn(10, requires_grad=True)
    lsq_fake_quantize(x, amax, ACT).sum().backward()
    assert amax.grad.item() == 0.0
    amax = torch.tensor(2.0, requires_grad=True)
    xh = torch.randn(10, dtype=torch.bfloat16, requires_grad=True)
    out = lsq_fake_quantize(xh, amax, ACT)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert xh.grad.dtype == torch.bfloat16 and amax.grad is not None


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_plain_ops_equal_the_native_cachemask_op(axis):
    """The CUDA path (plain ops, no zero-point read-back) forced on the CPU: same values and mask."""
    from quantlab.qat.learnable import _fake_quantize_with_mask

    torch.manual_seed(3)
    x = torch.randn(6, 7, 3) * 4
    spec = QuantizerSpec(num_bits=8, narrow_range=True, per_channel=True, axis=axis)
    scale = (torch.rand(x.shape[axis]) + 0.01) / 40
    x.select(axis, 0)[0, 0] = scale[0] * 127.5  # a tie that rounds to 128: clipped
    native = _fake_quantize_with_mask(x, scale, spec, plain_ops=False)
    plain = _fake_quantize_with_mask(x, scale, spec, plain_ops=True)
    assert torch.equal(native[0], plain[0]) and torch.equal(native[1], plain[1])
    assert not bool(plain[1].all()) and bool(plain[1].any())
