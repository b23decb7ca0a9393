"""Lightning and Hugging Face Trainer callbacks with the real libraries, then Q/DQ ONNX export."""
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab import qat
from quantlab.ptq import run_ptq
from tests.qat.models import tiny_cnn


@pytest.fixture()
def scales_file(tmp_path, calib_loader):
    return run_ptq(tiny_cnn(), calib_loader, ["max"]).scales["max"].save(tmp_path / "scales.max.json")


def _learned_amax(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("amax")}


def _export_and_run(save_dir, tmp_path, x):
    """The saved QAT result through the project's Q/DQ export; ORT must agree with PyTorch."""
    import onnxruntime as ort

    model = qat.load(tiny_cnn(), save_dir).eval()
    path = tmp_path / "qat.onnx"
    try:
        from quantlab.export.qdq import export_int8
    except ImportError:  # the export package not there yet: plain exporter of the fake-quant model
        torch.onnx.export(model, (x[:1],), str(path), dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
    else:
        export_int8(model, path, x[:1])
    graph = onnx.load(str(path))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and "DequantizeLinear" in ops
    # Q/DQ computed in float (QDQ fusion off), as TensorRT would: the same on every CPU.
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.argmax(got, 1).tolist() == np.argmax(expected, 1).tolist() or np.abs(got - expected).max() < 0.05


def test_lightning_callback_trains_and_exports(tmp_path, scales_file, fmnist_small):
    L = pytest.importorskip("lightning")
    train_set, test = fmnist_small

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_cnn()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    module = Module()
    callback = qat.LightningCallback(scales=scales_file, submodule="model", learn_amax=True,
                                     weight_ranges="learn", save_dir=tmp_path / "pl-qat")
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, range(128)), batch_size=32)
    before = None

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = _learned_amax(pl_module.model)
            optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            assert all(id(p) in optimized for n, p in pl_module.model.named_parameters() if n.endswith("amax"))

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, loader)
    assert trainer.global_step == 4 and qat.is_prepared(module.model)
    after = _learned_amax(module.model)
    assert before and any(not torch.equal(before[k], after[k]) for k in before), "ranges were learned"
    _export_and_run(tmp_path / "pl-qat", tmp_path, test[0][0])


def test_hf_trainer_callback_trains_and_exports(tmp_path, scales_file, fmnist_small):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    train_set, test = fmnist_small

    class ForTrainer(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, pixel_values, labels=None):
            logits = self.net(pixel_values)
            loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    rows = [{"pixel_values": train_set[i][0], "labels": int(train_set[i][1])} for i in range(128)]
    model = ForTrainer()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=16, learning_rate=1e-2,
        weight_decay=0.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    callback = qat.HFTrainerCallback(scales=scales_file, submodule="net", learn_amax=True, save_dir=tmp_path / "hf-qat")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    assert qat.is_prepared(model.net), "prepared when the Trainer was built, before its optimizer"
    before = _learned_amax(model.net)
    trainer.train()
    assert trainer.state.global_step == 4
    after = _learned_amax(model.net)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    _export_and_run(tmp_path / "hf-qat", tmp_path, test[0][0])


@pytest.mark.parametrize(
    "attr,modules,extra",
    [("LightningCallback", ["lightning", "lightning.pytorch"], "lightning"),
     ("HFTrainerCallback", ["transformers"], "hf")],
)
def test_missing_optional_dependency_gives_install_hint(monkeypatch, attr, modules, extra):
    # Simulated absence: a None entry in sys.modules makes `import name` raise ImportError.
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("quantlab.qat.lightning", "quantlab.qat.hf"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(qat.MissingDependencyError, match=rf"pip install 'quantlab\[{extra}\]'") as info:
        getattr(qat, attr)
    assert isinstance(info.value, ImportError) and isinstance(info.value, ql.QuantlabError)
