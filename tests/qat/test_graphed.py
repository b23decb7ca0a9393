"""qat.graphed: a QAT training step replayed as CUDA graphs.

The CPU tests check the clear errors (they run everywhere); the CUDA tests (run on
the GPU machine, skipped elsewhere) check that graphed steps train exactly like
eager ones: same losses, same parameters after several optimizer steps.
"""
import copy

import pytest
import torch
from torch import nn

from quantlab import qat
from quantlab.qat.errors import QATError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_cpu_model_is_refused_with_a_clear_error():
    model = qat.prepare(_net(), data=[(torch.randn(4, 3, 8, 8), None)], calibrator="max")
    with pytest.raises(QATError, match="CUDA"):
        qat.graphed(model, torch.randn(4, 3, 8, 8))


def test_eval_mode_and_bad_samples_are_refused():
    model = _net()
    with pytest.raises(QATError, match="tensors"):
        qat.graphed(model, [])
    with pytest.raises(QATError, match="no parameters"):
        qat.graphed(nn.ReLU(), torch.randn(2, 3))


VARIANTS = {
    "fixed ranges": {},
    "LSQ": {"learn_amax": True, "weight_ranges": "learn"},
    "BN folded": {"fold_bn": True},
}


@cuda
def test_errors_on_cuda():
    model = _net().cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    with pytest.raises(QATError, match="model.train"):
        qat.graphed(model.eval(), x)
    with pytest.raises(QATError, match="require grad"):
        qat.graphed(model.train(), x.requires_grad_(True))
    with pytest.raises(QATError, match="device"):
        qat.graphed(model.train(), torch.randn(4, 3, 8, 8))


@cuda
@pytest.mark.parametrize("options", list(VARIANTS.values()), ids=list(VARIANTS))
def test_graphed_steps_train_like_eager_steps(options):
    torch.manual_seed(0)
    torch.backends.cudnn.deterministic = True
    batches = [(torch.randn(8, 3, 16, 16, device="cuda"), torch.randint(0, 10, (8,), device="cuda")) for _ in range(4)]
    eager = qat.prepare(_net().cuda(), data=[(batches[0][0], None)], calibrator="max", **options).train()
    model = copy.deepcopy(eager)
    warmup = 2
    step_model = qat.graphed(model, batches[0][0], warmup=warmup)
    with torch.no_grad():  # the capture's eager warm-up steps moved BatchNorm's running statistics
        for _ in range(warmup):
            eager(batches[0][0])
    losses = {}
    for name, net, call in (("eager", eager, eager), ("graphed", model, step_model)):
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
        losses[name] = []
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(call(x), y)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["graphed"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():  # (extra state is a dict)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    assert losses["graphed"][-1] != losses["graphed"][0]  # it trained
