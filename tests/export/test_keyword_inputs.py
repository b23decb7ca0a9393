"""Models called with keyword inputs (a dict batch, as Hugging Face LMs are) export to Q/DQ ONNX."""
import numpy as np
import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab.export.qdq import export_int8
from quantlab.runtimes.onnxruntime.runner import OnnxRuntimeRunner


class TokenModel(nn.Module):
    """Embedding -> Linear -> Linear, called as model(input_ids=..., attention_mask=...)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.proj = nn.Linear(16, 32)
        self.head = nn.Linear(32, 64)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(torch.relu(self.proj(h)))


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_dict_inputs_export_and_run_in_onnx_runtime(exporter, tmp_path):
    torch.manual_seed(0)
    model = TokenModel().eval()
    batches = [{"input_ids": torch.randint(0, 64, (4, 12)), "attention_mask": torch.ones(4, 12)} for _ in range(3)]
    ql.quantize(model, ql.int8_config(), forward_loop=lambda m: [m(**b) for b in batches])
    ql.calibrate(model, calibrator="max")
    result = export_int8(model, tmp_path / "tokens.onnx", batches[0], exporter=exporter)
    # quantlab's runner computes the TensorRT form's Q/DQ with float kernels on every CPU (a raw
    # session lets ONNX Runtime run it as u8 x s8 integer GEMMs, which saturate without VNNI).
    runner = OnnxRuntimeRunner(result.path)
    names = runner.input_names
    assert names == ["input_ids", "attention_mask"]
    # Every quantizer maps to a tensor of the graph (names as the unwrapped model's).
    assert set(result.tensor_map) == {"proj:input", "proj:weight", "head:input", "head:weight"}
    test = {"input_ids": torch.randint(0, 64, (3, 12)), "attention_mask": torch.ones(3, 12)}
    test["attention_mask"][:, 8:] = 0  # the mask must reach the graph, not be folded away
    onnx_out = runner.run(dict(zip(names, [test["input_ids"].numpy(), test["attention_mask"].numpy()])))[0]
    with torch.no_grad():
        torch_out = model(**test).numpy()
    assert onnx_out.shape == torch_out.shape  # dynamic batch: 3 rows though traced with 2
    # Same INT8 grid; only rounding flips of values at a midpoint (one step each) may differ.
    assert np.abs(onnx_out - torch_out).max() < 0.05


def test_scales_with_float_layers_load_and_export_those_layers_in_float(tmp_path):
    # A mixed-precision scales file (autoprecision's output) loaded into a fresh model: the
    # float layers have no scale at all, yet the model exports, with no Q/DQ feeding them.
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (4, 12)), "attention_mask": torch.ones(4, 12)} for _ in range(2)]
    model = TokenModel().eval()
    ql.quantize(model, ql.int8_config(), forward_loop=lambda m: [m(**b) for b in batches])
    mixed = ql.calibrate(model, calibrator="max").without_layers(["proj"])
    mixed.save(tmp_path / "mixed.json")
    fresh = TokenModel().eval()
    fresh.load_state_dict(model.state_dict(), strict=False)
    ql.load_scales(fresh, tmp_path / "mixed.json")
    full = export_int8(model, tmp_path / "full.onnx", batches[0])
    part = export_int8(fresh, tmp_path / "mixed.onnx", batches[0])
    import onnx

    def quantize_nodes(path):
        return sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)

    assert quantize_nodes(part.path) < quantize_nodes(full.path)
    runner = OnnxRuntimeRunner(part.path)
    names = runner.input_names
    out = runner.run(dict(zip(names, [batches[1]["input_ids"].numpy(), batches[1]["attention_mask"].numpy()])))[0]
    with torch.no_grad():
        expected = fresh(**batches[1]).numpy()
    assert np.abs(out - expected).max() < 0.05


TOKEN_MODULE = '''
import torch
from quantlab.data import register_dataset
from tests.export.test_keyword_inputs import TokenModel


def build():
    torch.manual_seed(0)
    return TokenModel().eval()


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = torch.arange(12) * (i + 1) % 64
        return {"input_ids": ids, "attention_mask": torch.ones(12), "labels": ids}


# Like examples/smollm.py: importing the model's module registers its data spec.
register_dataset("tokens", lambda argument, **_: Tokens(), overwrite=True)
'''


def test_cli_export_of_a_keyword_model_whose_module_registers_its_data(tmp_path, capsys):
    from quantlab.cli.main import main

    from quantlab.data import registered_datasets

    source = tmp_path / "tokmodel.py"
    source.write_text(TOKEN_MODULE)
    # The same weights as the module's build(), without importing it: the spec must come from the CLI's import.
    assert "tokens" not in registered_datasets()
    torch.manual_seed(0)
    model = TokenModel().eval()
    inputs = {"input_ids": torch.stack([torch.arange(12) * (i + 1) % 64 for i in range(4)]), "attention_mask": torch.ones(4, 12)}
    ql.quantize(model, ql.int8_config(), forward_loop=lambda m: m(**inputs))
    scales = ql.calibrate(model, calibrator="max").without_layers(["proj"]).save(tmp_path / "scales.mixed.json")
    out = tmp_path / "tokens.int8.onnx"
    code = main(["export", "--model", f"{source}:build", "--scales", str(scales), "--data", "tokens:calib",
                 "--out", str(out), "--store", str(tmp_path / "runs.sqlite")])
    assert code == 0, capsys.readouterr()
    assert OnnxRuntimeRunner(out).input_names == ["input_ids", "attention_mask"]  # labels left out
