"""The mask is a parametrization before the weight quantizer, and QAT (loop and callbacks) keeps the pattern."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import quantlab as ql
from quantlab import qat, sparsity
from quantlab.attach import weight_quantizer
from quantlab.qat.loop import TrainConfig, train
from quantlab.sparsity.mask import SparsityMask, iter_masks, masked_layers, reapply_masks, remove_masks


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _data(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    return TensorDataset(x, (x[:, :4].argmax(1)))


def _assert_sparse(model):
    for ref in iter_masks(model):
        assert sparsity.is_2to4(ref.original, ref.mask.axis), ref.module_name
        assert torch.equal(ref.original != 0, ref.mask.mask & (ref.original != 0))


@pytest.mark.parametrize("order", ["prune-then-quantize", "quantize-then-prune"])
def test_the_quantizer_sees_the_masked_weight(order):
    model, x = _net(), torch.randn(64, 16)
    if order == "prune-then-quantize":
        sparsity.prune(model)
        ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(x))
    else:
        ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(x))
        sparsity.prune(model)
        ql.calibrate(model, "max")  # weight ranges from the pruned weights
    plist = model[0].parametrizations.weight
    assert isinstance(plist[0], SparsityMask) and plist[1] is weight_quantizer(model[0])
    fq = model[0].weight  # fake-quantized masked weight
    assert sparsity.is_2to4(fq, 1) and torch.equal(fq == 0, ~plist[0].mask | (fq == 0))
    # The quantizer's range comes from the masked weight (its kept entries).
    assert torch.allclose(weight_quantizer(model[0]).amax, plist.original.abs().amax(1))


def test_qat_steps_with_weight_decay_do_not_revive_pruned_weights():
    model = _net()
    sparsity.prune(model)
    data = _data()
    qat.prepare(model, data=DataLoader(data, batch_size=64), calibrator="max")
    before = {ref.module_name: ref.original.detach().clone() for ref in iter_masks(model)}
    result = train(model, data, TrainConfig(epochs=2, lr=5e-2, weight_decay=0.1, batch_size=32, optimizer="sgd"))
    assert result.steps == 16
    for ref in iter_masks(model):
        assert not torch.equal(ref.original, before[ref.module_name])  # it trained
        assert torch.all(ref.original[~ref.mask.mask] == 0)  # pruned entries are exactly zero
    _assert_sparse(model)
    assert sparsity.is_2to4(model[0].weight, 1)


def test_gradients_of_pruned_weights_are_zero_and_reapply_restores_a_tampered_weight():
    model = _net()
    sparsity.prune(model)
    model(torch.randn(8, 16)).sum().backward()
    ref = next(iter_masks(model))
    assert torch.all(ref.original.grad[~ref.mask.mask] == 0)
    with torch.no_grad():
        ref.original.add_(1.0)  # e.g. a hand-written update that touches every entry
    assert not sparsity.is_2to4(ref.original, 1)
    assert reapply_masks(model) == 2
    assert sparsity.is_2to4(ref.original, 1)


def test_removing_masks_from_a_copy_keeps_the_original_working():
    model = _net()
    sparsity.prune(model)
    clone = copy.deepcopy(model)
    assert remove_masks(clone) == 2
    assert not list(iter_masks(clone)) and sparsity.is_2to4(clone[0].weight, 1)
    assert model[0].weight.shape == (32, 16) and len(list(iter_masks(model))) == 2


def test_removing_quantizers_keeps_the_mask_and_leaves_the_original_quantized():
    model, x = _net(), torch.randn(64, 16)
    sparsity.prune(model)
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(x))
    before = model(x)
    clone = copy.deepcopy(model)
    ql.remove_quantizers(clone)  # the quantizer leaves the copy's list; the mask stays first
    assert not ql.is_quantized(clone) and masked_layers(clone) == ["0", "2"]
    assert sparsity.is_2to4(clone[0].weight, 1)
    assert ql.is_quantized(model) and torch.equal(model(x), before)
    remove_masks(clone)  # the last parametrization: the copy's modules become plain Linear again
    assert type(clone[0]) is nn.Linear and masked_layers(model) == ["0", "2"] and torch.equal(model(x), before)


def test_qat_save_writes_sparse_weights_and_load_adopts_them(tmp_path):
    model = _net()
    sparsity.prune(model)
    data = _data()
    qat.prepare(model, data=DataLoader(data, batch_size=64), calibrator="max")
    train(model, data, TrainConfig(epochs=1, lr=1e-2, batch_size=32))
    qat.save(model, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert sparsity.is_2to4(state["0.weight"], 1) and sparsity.is_2to4(state["2.weight"], 1)
    fresh = qat.load(_net(), tmp_path / "run")
    assert sparsity.masks_from_weights(fresh) == ["0", "2"]


def test_lightning_callback_keeps_the_pattern(tmp_path):
    L = pytest.importorskip("lightning")
    data = _data()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _net()
            sparsity.prune(self.model)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=5e-2, weight_decay=0.5)

    module = Module()
    callback = qat.LightningCallback(data=DataLoader(data, batch_size=64), calibrator="max", submodule="model")
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path)
    start = {ref.module_name: ref.original.detach().clone() for ref in iter_masks(module.model)}
    trainer.fit(module, DataLoader(data, batch_size=32))
    assert any(not torch.equal(ref.original, start[ref.module_name]) for ref in iter_masks(module.model))
    _assert_sparse(module.model)


def test_hf_trainer_callback_keeps_the_pattern(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    data = _data(128)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _net()

        def forward(self, x, labels=None):
            logits = self.body(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    model = Net()
    sparsity.prune(model)

    def collate(items):
        return {"x": torch.stack([i[0] for i in items]), "labels": torch.stack([i[1] for i in items])}

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=32,
                                          learning_rate=5e-2, weight_decay=0.5, report_to=[], use_cpu=True,
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True)
    callback = qat.HFTrainerCallback(data=[data.tensors[0][:64]], calibrator="max", submodule="body")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[callback])
    trainer.train()
    assert qat.is_prepared(model.body)
    _assert_sparse(model)
