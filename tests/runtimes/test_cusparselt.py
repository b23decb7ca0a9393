"""The INT8 runners on the CPU: the dense path against the exact result, conversion, and clear errors where
cuSPARSELt cannot run (its GPU path is measured by benchmarks/bench_sparse_gpu.py on an H200)."""
import shutil

import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab import sparsity
from quantlab.runtimes.cusparselt import library
from quantlab.runtimes.cusparselt.convert import ConversionError, convert_linears, int8_params
from quantlab.runtimes.cusparselt.kernels import dequantize_int32, quantize_int8
from quantlab.runtimes.cusparselt.linear import DenseInt8Linear
from quantlab.runtimes.cusparselt.verify import dequantization_bound


def _quantized(k=32, n=24, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.Linear(n, 8))
    with torch.no_grad():
        model[0].bias.normal_()
    sparsity.prune(model)
    x = torch.randn(128, k)
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(x))
    return model


def test_int8_params_are_the_fake_quant_integers():
    from quantlab.export.fold import quantize_weight

    model = _quantized()
    params = int8_params(model[0], "0")
    scale = params.weight_scale.numpy()
    expected = quantize_weight(model[0].parametrizations.weight.original.detach().numpy(), scale, 0)
    assert torch.equal(params.weight, torch.from_numpy(expected))
    assert sparsity.is_2to4(params.weight, 1)
    x = torch.randn(64, 32) * 3
    q = quantize_int8(x.half(), params.inv_input_scale)
    fq = model[0].input_quantizer(x.half().float())  # fake quantization of the same input
    assert torch.equal(q.float() * params.input_scale, fq)


def test_dense_int8_runner_is_within_one_fp16_rounding_of_the_exact_product():
    model = _quantized()
    params = int8_params(model[0], "0")
    runner = DenseInt8Linear(params)
    x = torch.randn(256, 32).half()
    y = runner(x).double()
    q = quantize_int8(x, params.inv_input_scale)
    acc = q.double() @ params.weight.double().t()
    exact = acc * params.alpha.double() + params.bias.double()
    bound = dequantization_bound(exact, acc * params.alpha.double(), params.bias.double())
    ratio = float(((y - exact).abs() / bound).max())
    assert ratio <= 1.0
    # The bound is tight enough to catch one FP16 ulp of error on a typical output.
    nudged = torch.nextafter(y.half(), torch.tensor(float("inf"), dtype=torch.half)).double()
    assert float(((nudged - exact).abs() / bound).max()) > 1.0


def test_dequantize_matches_its_formula():
    acc = torch.randint(-(1 << 20), 1 << 20, (16, 8), dtype=torch.int32)
    alpha, bias = torch.rand(8) * 1e-3, torch.randn(8)
    assert torch.equal(dequantize_int32(acc, alpha, bias), (acc.float() * alpha + bias).half())


def test_convert_int8_runs_the_model_close_to_the_fake_quant_model():
    model = _quantized()
    x = torch.randn(64, 32)
    with torch.no_grad():
        reference = model(x)
        report = convert_linears(model, "int8")
        got = model(x.half()).float()
    assert report.converted == {"0": "int8", "2": "int8"} and not report.kept
    assert isinstance(model[0], DenseInt8Linear)
    assert float((got - reference).abs().max()) <= 0.02 * float(reference.abs().max())


def test_sparse_mode_without_cusparselt_falls_back_or_fails_naming_the_layer():
    model = _quantized()
    with pytest.raises(ConversionError, match="layer '0' cannot run 2:4 sparse: .*NVIDIA GPU"):
        convert_linears(model, "sparse-int8", fallback=False)
    report = convert_linears(model, "sparse-int8")
    assert set(report.converted.values()) == {"int8"} and "needs an NVIDIA GPU" in report.kept["0"]


def test_uncalibrated_or_unsupported_layers_are_named():
    plain = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ConversionError, match="layer 'head' has no quantizers"):
        int8_params(plain[0], "head")
    assert convert_linears(plain, "int8").kept["0"].startswith("layer '0' has no quantizers")
    with pytest.raises(ConversionError, match="unknown mode 'int4'"):
        convert_linears(plain, "int4")


def test_load_library_says_what_is_missing(monkeypatch, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(library.CuSparseLtUnavailableError, match="needs an NVIDIA GPU"):
            library.load_library()
        assert not library.cusparselt_available()
    monkeypatch.setattr(library, "_LIBRARY", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(library.CuSparseLtUnavailableError, match="compute capability 8.0 or newer; Tesla T4 is 7.x"):
        library.load_library()


def test_find_cusparselt_reports_a_missing_library_or_header(monkeypatch, tmp_path):
    monkeypatch.setattr(library, "DISTRIBUTIONS", ())
    monkeypatch.setattr(library, "_root_candidates", lambda: [tmp_path])
    with pytest.raises(library.CuSparseLtUnavailableError, match="libcusparseLt.so not found .*pip install nvidia-cusparselt-cu13"):
        library.find_cusparselt()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libcusparseLt.so.0").write_bytes(b"")
    with pytest.raises(library.CuSparseLtUnavailableError, match="not its header cusparseLt.h"):
        library.find_cusparselt()
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cusparseLt.h").write_text("#error this is not the real header\n")
    paths = library.find_cusparselt()
    assert paths.include_dir == tmp_path / "include" and paths.library == tmp_path / "lib" / "libcusparseLt.so.0"
    if shutil.which("g++") or shutil.which("c++"):
        with pytest.raises(library.CuSparseLtUnavailableError, match="(?s)building the cuSPARSELt shim failed.*not the real header"):
            library.build_shim(paths, tmp_path / "cache")
        assert not list((tmp_path / "cache").glob("*.so"))


def test_the_shim_source_ships_with_the_package():
    assert library.SHIM_SOURCE.is_file() and "cusparseLtMatmul(" in library.SHIM_SOURCE.read_text()


def test_measure_speedup_times_fp16_against_the_int8_model_and_leaves_the_model_as_it_was():
    from quantlab.runtimes.cusparselt.speed import measure_speedup
    from quantlab.sparsity.mask import iter_masks

    model = _quantized()
    x = torch.randn(32, 32)
    with torch.no_grad():
        before = model(x)
    result = measure_speedup(model, x, mode="int8")  # the dense INT8 runner works on the CPU too
    assert result["converted"] == 2 and result["timing"] == "eager-cpu/eager-cpu"
    assert result["fp16_ms"] > 0 and result["int8_ms"] > 0 and result["speedup"] == pytest.approx(result["fp16_ms"] / result["int8_ms"])
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the copies were changed, not the model
    assert len(list(iter_masks(model))) == 2 and ql.is_quantized(model)
