"""The built-in loop: the same schedule after resume, NaN loss, causal LM, LR schedule."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from quantlab import qat
from quantlab.qat.checkpoint import load_checkpoint
from quantlab.qat.loop import EpochSampler, TrainConfig, cosine_schedule, train
from tests.qat.models import tiny_cnn_dropout


def _prepared(calib):
    return qat.prepare(tiny_cnn_dropout(), data=calib, calibrator="max", learn_amax=True, fold_bn=True, freeze_bn_after=5)


class _Stop(Exception):
    pass


def test_resume_continues_the_same_schedule(tmp_path, fmnist_small, calib_loader):
    train_set, _ = fmnist_small
    data = Subset(train_set, range(320))  # 10 steps per epoch at batch 32
    config = TrainConfig(epochs=1.5, lr=3e-3, batch_size=32, checkpoint_every=4, warmup_steps=2, seed=7)
    assert config.freeze_bn_after is None

    straight = _prepared(calib_loader)
    lrs = []
    full = train(straight, data, config, checkpoint_dir=tmp_path / "a", progress=lambda p: lrs.append(p.lr))
    assert full.steps == full.total_steps == 15 and len(full.losses) == 15

    interrupted = _prepared(calib_loader)

    def stop_at_9(p):
        if p.step == 9:
            raise _Stop

    with pytest.raises(_Stop):
        train(interrupted, data, config, checkpoint_dir=tmp_path / "b", progress=stop_at_9)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 8  # the last good checkpoint

    # A fresh process would rebuild and re-prepare the model, then resume.
    resumed_model = _prepared(calib_loader)
    torch.manual_seed(1234)  # resume must not depend on the caller's RNG
    resumed_lrs = []
    resumed = train(resumed_model, data, config, checkpoint_dir=tmp_path / "b", resume=True,
                    progress=lambda p: resumed_lrs.append(p.lr))
    assert resumed.resumed_from == 8 and resumed.steps == 15
    assert resumed.losses == full.losses  # same batches, dropout masks, LR and optimizer state
    assert resumed_lrs == lrs[8:]
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert resumed_model.stem[0].bn_frozen and resumed_model.stem[0].train_steps == 15


def test_resume_with_another_schedule_is_refused(tmp_path, fmnist_small, calib_loader):
    train_set, _ = fmnist_small
    data = Subset(train_set, range(128))
    train(_prepared(calib_loader), data, TrainConfig(max_steps=2, batch_size=32, checkpoint_every=1), checkpoint_dir=tmp_path)
    with pytest.raises(qat.QATError, match="lr="):
        train(_prepared(calib_loader), data, TrainConfig(max_steps=2, lr=1e-3, batch_size=32), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(qat.QATError, match="no checkpoint"):
        train(_prepared(calib_loader), data, TrainConfig(max_steps=2), checkpoint_dir=tmp_path / "none", resume=True)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.pop("model"), "model must be a dict, got NoneType"),
    (lambda p: p.update(step="abc"), r"step must be an integer in 0\.\.2 .*got 'abc'"),
    (lambda p: p.update(step=10**6), r"step must be an integer in 0\.\.2 .*got 1000000"),
    (lambda p: p.update(losses="abc"), r"losses must be one finite number per step \(1\), got str"),
    (lambda p: p["model"].pop(next(iter(p["model"]))), "its model state does not fit this run"),
    (lambda p: p.update(optimizer={"x": 1}), "its optimizer state does not fit this run"),
    (lambda p: p["scheduler"].update(base_lrs="abc"), "scheduler must hold last_epoch = step"),
    (lambda p: p["rng"][0].update(python=5), "its RNG state of rank 0 is damaged"),
    (lambda p: next(t for t in p["model"].values() if isinstance(t, torch.Tensor) and t.is_floating_point()).fill_(float("nan")), "holds NaN/Inf values"),
    (lambda p: p.update(version="x"), "checkpoint version 'x' is not one this quantlab reads"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, fmnist_small, calib_loader, damage, message):
    # Each failed as a bare KeyError/ValueError/RuntimeError/TypeError, or (step, losses) resumed a
    # schedule that never was: steps=1000000 reported, three "losses" made of the letters of "abc".
    train_set, _ = fmnist_small
    data = Subset(train_set, range(64))
    config = TrainConfig(max_steps=2, batch_size=32, checkpoint_every=1)

    def stop_after_checkpoint(p):
        raise _Stop

    with pytest.raises(_Stop):
        train(_prepared(calib_loader), data, config, checkpoint_dir=tmp_path, progress=stop_after_checkpoint)
    path = tmp_path / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    damage(payload)
    torch.save(payload, path)
    with pytest.raises(qat.QATError, match=message) as error:
        train(_prepared(calib_loader), data, config, checkpoint_dir=tmp_path, resume=True)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


class _PassesNaN(nn.Module):
    """A network whose output turns NaN when its input holds a NaN (the quantizers would clamp it)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) + 0.0 * x.mean(dim=(1, 2, 3))[:, None]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, fmnist_small, calib_loader):
    train_set, _ = fmnist_small
    x = train_set.tensors[0][:192].clone()
    x[6 * 32 - 1] = float("nan")  # the last sample of batch 6 (in order): step 6
    data = torch.utils.data.TensorDataset(x, train_set.tensors[1][:192])
    model = _PassesNaN(_prepared(calib_loader))
    config = TrainConfig(batch_size=32, checkpoint_every=4, shuffle=False)
    with pytest.raises(qat.NonFiniteLossError, match=r"loss is nan at step 6 of 6") as info:
        train(model, data, config, checkpoint_dir=tmp_path)
    assert "checkpoint.pt (step 4)" in str(info.value)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["step"] == 4 and all(math.isfinite(v) for v in payload["losses"])
    assert all(torch.isfinite(p).all() for p in model.parameters())  # stopped before the update


def test_loss_decreases_on_fmnist(fmnist_small, calib_loader):
    train_set, _ = fmnist_small
    model = _prepared(calib_loader)
    result = train(model, train_set, TrainConfig(epochs=1, lr=3e-3, batch_size=32))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first, (first, last)


def test_causal_lm_task_trains_a_tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    # A repetitive "language": the next token is (token + 1) % 64.
    starts = torch.randint(0, 64, (96, 1))
    ids = (starts + torch.arange(16)) % 64
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    calib = [{"input_ids": ids[:16], "attention_mask": torch.ones_like(ids[:16])}]
    qat.prepare(model, data=calib, calibrator="max", learn_amax=True)
    result = train(model, Rows(), TrainConfig(task="causal_lm", epochs=2, lr=3e-3, batch_size=16))
    assert result.steps == 12
    assert result.losses[-1] < result.losses[0] - 0.5


def test_cosine_schedule_and_sampler():
    f = cosine_schedule(10, warmup_steps=2, min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(2, 10))
    a = EpochSampler(10, rank=0, world_size=2, seed=1)
    b = EpochSampler(10, rank=1, world_size=2, seed=1)
    assert sorted(list(a) + list(b)) == list(range(10))
    a.set_epoch(0, start=2)
    assert list(a) == list(EpochSampler(10, rank=0, world_size=2, seed=1))[2:]
    a.set_epoch(1)
    assert list(a) != list(EpochSampler(10, rank=0, world_size=2, seed=1))


@pytest.mark.parametrize("field, value, message", [
    ("weight_decay", -5.0, "weight_decay must be a finite number >= 0"),  # was trained with: weights pushed outwards
    ("range_lr", -1.0, "range_lr must be a finite number > 0"),  # was: learned ranges moved uphill
    ("min_lr_ratio", -1.0, r"min_lr_ratio must be a finite number in \[0, 1\]"),  # was: a negative LR at the end
    ("grad_clip", -1.0, "grad_clip must be a finite number > 0"),  # was: every gradient's sign flipped
    ("warmup_steps", -1, "warmup_steps must be an integer >= 0"),
    ("epochs", float("inf"), "epochs must be a finite number > 0"),  # was an OverflowError in train()
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("max_steps", 2.5, "max_steps must be an integer >= 1"),
    ("shuffle", "no", "shuffle must be True or False"),
])
def test_train_config_refuses_out_of_bounds_values(field, value, message):
    with pytest.raises(qat.QATError, match=message):
        TrainConfig(**{field: value})


def test_bad_config():
    with pytest.raises(qat.QATError, match="task"):
        TrainConfig(task="segmentation")
    with pytest.raises(qat.QATError, match="lr"):
        TrainConfig(lr=float("nan"))
