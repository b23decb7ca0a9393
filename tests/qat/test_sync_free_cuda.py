"""A QAT training step never waits for the GPU (runs only where CUDA is available).

A host-device synchronization per layer serializes the host and the GPU: the step
then costs host time plus GPU time instead of the larger of the two, and every
stall of the host shows in the step time. CI has no GPU; benchmarks/RESULTS.md
records the run on the GPU machine.
"""
import pytest
import torch
from torch import nn

from quantlab import qat
from quantlab.config import QuantizerSpec
from quantlab.qat.learnable import _fake_quantize_with_mask, lsq_fake_quantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).cuda()


VARIANTS = {
    "fixed ranges": {},
    "LSQ, learned weight ranges": {"learn_amax": True, "weight_ranges": "learn"},
    "BN folded": {"fold_bn": True},
    "BN folded, LSQ": {"fold_bn": True, "learn_amax": True, "weight_ranges": "learn"},
}


@pytest.mark.parametrize("options", list(VARIANTS.values()), ids=list(VARIANTS))
def test_training_step_has_no_sync(options):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    model = qat.prepare(_net(), data=[(x, None)], calibrator="max", **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # first step: lazy set-up may read back once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_lsq_on_cuda_equals_the_cpu():
    """Per-channel plain ops on CUDA, native cachemask op on the CPU: same values, masks and x gradients."""
    torch.manual_seed(1)
    spec = QuantizerSpec(num_bits=8, narrow_range=True, per_channel=True, axis=0)
    x = torch.randn(32, 16, 3, 3) * 3
    scale = torch.rand(32) * 0.05 + 1e-3
    cpu = _fake_quantize_with_mask(x, scale, spec)
    gpu = _fake_quantize_with_mask(x.cuda(), scale.cuda(), spec)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    amax = (scale * 127).requires_grad_(True)
    up = torch.randn_like(x)
    grads = []
    for device in ("cpu", "cuda"):
        xa = x.detach().to(device).requires_grad_(True)  # a leaf on each device
        a = amax.detach().to(device).requires_grad_(True)
        lsq_fake_quantize(xa, a, spec).backward(up.to(device))
        grads.append((xa.grad.cpu(), a.grad.cpu()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-7)
