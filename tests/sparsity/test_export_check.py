"""Export keeps the pattern in the INT8 weights; the checker reports it per layer and catches a weight that breaks it."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab import sparsity
from quantlab.cli.main import main
from quantlab.sparsity.check import check_model_sparsity, check_onnx_sparsity
from quantlab.sparsity.mask import iter_masks

FACTORY = "tests/qat/models.py:tiny_cnn"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, groups=8), nn.Flatten(),
                         nn.Linear(8 * 2 * 2, 12))


def _int8_weights(path):
    graph = onnx.load(str(path)).graph
    return {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1}


def test_qdq_export_carries_2to4_int8_weights_and_runs_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from quantlab.export import export_int8

    model, x = _model(), torch.randn(16, 8, 4, 4)
    report = sparsity.prune(model)
    assert [layer.name for layer in report.layers] == ["0", "4"] and [n for n, _ in report.skipped] == ["2"]
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(x))
    path = tmp_path / "sparse.int8.onnx"
    export_int8(model, path, x[:2])
    weights = _int8_weights(path)
    assert set(weights) == {"0.weight", "2.weight", "4.weight"}
    # The INT8 values (after quantization) are 2:4 along the input axis: [K, C, R, S] axis 1, Gemm [N, K] axis 1.
    for name in ("0.weight", "4.weight"):
        groups = (np.moveaxis(weights[name], 1, -1).reshape(*np.moveaxis(weights[name], 1, -1).shape[:-1], -1, 4) != 0).sum(-1)
        assert groups.max() <= 2 and groups.min() == 2, name
    verdicts = {layer.module: layer for layer in check_onnx_sparsity(path).layers}
    assert verdicts["0"].compliant and verdicts["4"].compliant and verdicts["0"].dtype == "int8"
    assert not verdicts["2"].eligible and "per group of a 8-group conv" in verdicts["2"].reason
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_the_checker_catches_a_weight_that_breaks_the_pattern(tmp_path):
    from quantlab.export import export_int8

    model, x = _model(), torch.randn(16, 8, 4, 4)
    sparsity.prune(model)
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(x))
    ref = next(r for r in iter_masks(model) if r.module_name == "4")
    with torch.no_grad():
        ref.original[0, 0:4] = torch.tensor([0.5, 0.5, 0.5, 0.5])  # one group with four non-zeros, mask bypassed
    by_layer = {layer.layer: layer for layer in check_model_sparsity(model).layers}
    assert not by_layer["4"].compliant and by_layer["4"].violations == 1 and by_layer["4"].masked
    path = tmp_path / "broken.int8.onnx"
    export_int8(model, path, x[:2])  # the mask is the identity in export: the stored weight is what TensorRT gets
    verdicts = {layer.module: layer for layer in check_onnx_sparsity(path).layers}
    assert verdicts["0"].compliant
    assert not verdicts["4"].compliant and verdicts["4"].violations == 1 and verdicts["4"].groups == 12 * 32 // 4


def test_cli_prune_calibrate_export_check_and_trtexec(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pruned = tmp_path / "pruned.pt"
    assert main(["prune", "--model", FACTORY, "--out", str(pruned), "--report", str(tmp_path / "prune.json")]) == 0
    printed = capsys.readouterr().out
    assert "2:4 (magnitude): pruned 2 layer(s)" in printed and "left dense: stem.0" in printed and "dw (" in printed
    state = torch.load(pruned, weights_only=True)
    assert sparsity.is_2to4(state["pw.weight"], 1) and sparsity.is_2to4(state["fc.weight"], 1)
    assert main(["calibrate", "--model", FACTORY, "--weights", str(pruned), "--data", "fmnist:calib[:128]",
                 "--calibrators", "max", "--out", str(tmp_path / "cal")]) == 0
    scales = next((tmp_path / "cal").glob("scales.max.json"))
    out = tmp_path / "sparse.onnx"
    code = main(["export", "--model", FACTORY, "--weights", str(pruned), "--scales", str(scales), "--input-shape", "1,28,28",
                 "--out", str(out), "--sparsity", "2:4"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "2:4: 2 of 2 eligible layer(s) hold the pattern" in printed
    assert main(["check", str(out), "--sparsity", "--strict"]) == 0
    # The dense model's export: the same check fails under --strict, and export --sparsity refuses it.
    dense = tmp_path / "dense.onnx"
    assert main(["export", "--model", FACTORY, "--scales", str(scales), "--input-shape", "1,28,28", "--out", str(dense),
                 "--sparsity", "2:4"]) == 1
    assert "no layer of the model holds the pattern" in capsys.readouterr().out
    assert main(["check", str(dense), "--sparsity", "--strict"]) == 1
    assert "2:4: 0 of 2 eligible layer(s)" in capsys.readouterr().out
    assert main(["build", str(out), "--out", str(tmp_path / "m.plan"), "--print-trtexec", "--sparsity"]) == 0
    printed = capsys.readouterr().out
    assert "--sparsity=enable" in printed and "unverified here" in printed


def test_prune_cli_refuses_to_overwrite_its_input_and_names_a_bad_layer(tmp_path, capsys):
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    assert main(["prune", "--model", FACTORY, "--weights", str(weights), "--out", str(weights)]) == 1
    assert "would overwrite an input" in capsys.readouterr().err
    assert main(["prune", "--model", FACTORY, "--sparsity-include", "stem.0", "--out", str(tmp_path / "p.pt")]) == 1
    err = capsys.readouterr().err
    assert "layer 'stem.0' (weight (8, 1, 3, 3)): input dimension 1 is not a multiple of 4" in err
    assert not (tmp_path / "p.pt").exists()
