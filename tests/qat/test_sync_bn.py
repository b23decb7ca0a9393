"""SyncBatchNorm for the run: parameters shared with the original BatchNorms, swapped back after."""
import copy

import torch
from torch import nn

from quantlab.qat.bn_fold import QATConvBn2d, fold_conv_bn, freeze_bn_stats
from quantlab.qat.loop import TrainConfig, train
from quantlab.qat.sync_bn import synced_batchnorm
from tests.qat.models import randomize_bn, tiny_cnn


def test_swap_shares_parameters_and_buffers_and_is_undone():
    model = randomize_bn(tiny_cnn())
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 1, 28, 28)
    with synced_batchnorm(model) as swapped:
        assert swapped == len(originals) == 3
        synced = {n: m for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)}
        assert synced.keys() == originals.keys() and list(model.state_dict()) == keys
        for name, sync in synced.items():
            assert sync.weight is originals[name].weight and sync.running_mean is originals[name].running_mean
        # Outside a process group SyncBatchNorm computes what BatchNorm does.
        model.train(), reference.train()
        assert torch.allclose(model(x), reference(x), atol=1e-6)
        model(x).square().mean().backward()
        optimizer.step()
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    changed = [n for n in originals if not torch.equal(originals[n].weight, reference.get_submodule(n).weight)]
    assert changed == list(originals)  # the step updated the original modules' parameters
    assert not torch.equal(originals["stem.1"].running_mean, randomize_bn(tiny_cnn()).stem[1].running_mean)


def test_training_flag_and_folded_batchnorms():
    model = tiny_cnn()
    fold_conv_bn(model, [("stem.0", "stem.1")])
    model.eval()
    with synced_batchnorm(model) as swapped:
        assert swapped == 2  # dw_bn and pw_bn; the folded stem BN is computed by its wrapper
        assert isinstance(model.stem[0], QATConvBn2d) and not isinstance(model.stem[0].bn, nn.SyncBatchNorm)
        model.pw_bn.train()
    assert type(model.pw_bn) is nn.BatchNorm2d and model.pw_bn.training and not model.dw_bn.training
    with synced_batchnorm(model, enabled=False) as swapped:
        assert swapped == 0 and type(model.dw_bn) is nn.BatchNorm2d


def test_loop_runs_with_sync_batchnorm_outside_ddp_and_keeps_frozen_statistics():
    from quantlab.data import load_fmnist
    from torch.utils.data import TensorDataset

    x, y = load_fmnist("train[:128]")
    model = tiny_cnn()
    result = train(model, TensorDataset(x, y), TrainConfig(max_steps=4, batch_size=16, sync_batchnorm=True, freeze_bn_after=2))
    assert result.steps == 4 and all(type(m) is not nn.SyncBatchNorm for m in model.modules())
    assert freeze_bn_stats(model) == 0  # already frozen: every BatchNorm kept its hook



def test_hooks_and_frozen_statistics_survive_the_swap():
    model = randomize_bn(tiny_cnn())
    assert freeze_bn_stats(model) == 3  # frozen BEFORE the run: must stay frozen in it
    calls = []
    model.pw_bn.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    frozen = model.stem[1].running_mean.clone()
    with synced_batchnorm(model):
        model.train()
        model(torch.randn(8, 1, 28, 28))
        assert torch.equal(model.stem[1].running_mean, frozen)
    assert calls == ["SyncBatchNorm"]
    model(torch.randn(8, 1, 28, 28))
    assert calls == ["SyncBatchNorm", "BatchNorm2d"]
    fresh = tiny_cnn()
    with synced_batchnorm(fresh):
        assert freeze_bn_stats(fresh) == 3  # frozen DURING the run: still frozen after it
    assert freeze_bn_stats(fresh) == 0
    fresh.train()
    before = fresh.dw_bn.running_var.clone()
    fresh(torch.randn(8, 1, 28, 28) * 3)
    assert torch.equal(fresh.dw_bn.running_var, before)
