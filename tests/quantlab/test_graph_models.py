"""Saved graphs as --model: TorchScript (torch.jit.save) and exported programs (torch.export.save), end to end."""
import json
import warnings

import numpy as np
import pytest
import torch

from quantlab.cli.main import main
from quantlab.graph_models import ModelInputError, load_exported_program, load_torchscript
from quantlab.model_source import ModelLoadError, load_model
from quantlab.scales import Scales

MODEL = "tests/qat/models.py:tiny_cnn"
DATA = "fmnist:calib[:128]"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny CNN saved three ways (real files, as a user would save them)."""
    from tests.qat.models import randomize_bn, tiny_cnn

    folder = tmp_path_factory.mktemp("graphs")
    model = randomize_bn(tiny_cnn()).eval()
    torch.save(model.state_dict(), folder / "weights.pt")
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, x), folder / "traced.pt")
        torch.jit.save(torch.jit.script(model), folder / "scripted.pt")
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}}), folder / "dynamic.pt2")
        torch.export.save(torch.export.export(model, (x,)), folder / "static.pt2")
    return folder, model


def _quantizable(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def test_saved_graphs_get_their_modules_back_under_the_same_names(saved):
    folder, model = saved
    x = torch.randn(3, 1, 28, 28)
    expected = model(x)
    loaded = {
        "pt2": load_exported_program(folder / "dynamic.pt2"),
        "traced": load_torchscript(folder / "traced.pt", torch.randn(2, 1, 28, 28)),
        "scripted": load_torchscript(folder / "scripted.pt", torch.randn(2, 1, 28, 28)),
    }
    for name, graph in loaded.items():
        graph.eval()  # module() forbids eval(); quantlab gives it back
        assert _quantizable(graph) == _quantizable(model), name
        torch.testing.assert_close(graph(x), expected, rtol=1e-5, atol=1e-5, msg=name)
    # TorchScript is shape-generic: a final batch of one sample must work too.
    assert loaded["traced"](torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_static_batch_program_says_which_shape_it_was_captured_for(saved):
    folder, _ = saved
    graph = load_exported_program(folder / "static.pt2")
    with pytest.raises(ModelInputError, match=r"captured for \(4, 1, 28, 28\)"):
        graph(torch.randn(2, 1, 28, 28))


def test_torchscript_from_python_needs_an_example_batch(saved):
    folder, _ = saved
    with pytest.raises(ModelLoadError, match="example batch"):
        load_model(str(folder / "traced.pt"))


def test_cli_calibrate_compare_export_on_saved_files(saved, tmp_path, monkeypatch, capsys):
    folder, _ = saved
    monkeypatch.setenv("QUANTLAB_STORE", str(tmp_path / "runs.sqlite"))
    common = ["--data", DATA, "--max-batches", "2", "--calibrators", "max", "--device", "cpu"]
    # The Python model and its TorchScript file calibrate to the same ranges under the same names.
    assert main(["calibrate", "--model", MODEL, "--weights", str(folder / "weights.pt"), *common, "--out", str(tmp_path / "py")]) == 0
    assert main(["calibrate", "--model", str(folder / "traced.pt"), *common, "--out", str(tmp_path / "ts")]) == 0
    py = Scales.load(tmp_path / "py" / "scales.max.json").as_dict()
    ts = Scales.load(tmp_path / "ts" / "scales.max.json").as_dict()
    assert py.keys() == ts.keys()
    for key in py:
        np.testing.assert_allclose(py[key].amax, ts[key].amax, rtol=1e-6, err_msg=key)
    # compare on the exported program records a run like any model.
    assert main(["compare", "--model", str(folder / "dynamic.pt2"), "--data", DATA, "--eval", "fmnist:test[:128]",
                 "--calibrators", "max", "--max-batches", "2", "--layer-batches", "1", "--out", str(tmp_path / "cmp")]) == 0
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert {r["precision"] for r in results["rows"]} == {"fp32", "fp16", "int8"}
    # INT8 export from the saved graph equals the one from the Python model (ONNX Runtime, same batch).
    import onnxruntime as ort

    scales = str(tmp_path / "py" / "scales.max.json")
    outputs = {}
    for name, spec in (("py", MODEL), ("pt2", str(folder / "dynamic.pt2")), ("ts", str(folder / "traced.pt"))):
        extra = ["--weights", str(folder / "weights.pt")] if name == "py" else []
        out = tmp_path / f"{name}.onnx"
        assert main(["export", "--model", spec, *extra, "--scales", scales, "--data", DATA, "--out", str(out)]) == 0, name
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        batch = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
        outputs[name] = session.run(None, {session.get_inputs()[0].name: batch})[0]
    np.testing.assert_allclose(outputs["pt2"], outputs["py"], atol=1e-5)
    np.testing.assert_allclose(outputs["ts"], outputs["py"], atol=1e-5)
    assert "check: 0 error(s)" in capsys.readouterr().out


def test_cli_saved_graph_errors_are_one_line(saved, tmp_path, monkeypatch, capsys):
    folder, _ = saved
    monkeypatch.setenv("QUANTLAB_STORE", str(tmp_path / "runs.sqlite"))
    assert main(["calibrate", "--model", str(folder / "static.pt2"), "--data", DATA, "--calibrators", "max",
                 "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "captured for (4, 1, 28, 28)" in err and "dynamic" in err
    assert main(["qat", "--model", str(folder / "dynamic.pt2"), "--data", "fmnist:train[:64]", "--eval", "fmnist:test[:64]",
                 "--max-steps", "1", "--no-store", "--out", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inference mode" in err and "file.py:factory" in err
    assert main(["calibrate", "--model", str(tmp_path / "missing.pt"), "--data", DATA, "--out", str(tmp_path / "b")]) == 1
    assert "model file not found" in capsys.readouterr().err
