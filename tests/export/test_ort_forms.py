"""The ort-cpu integer forms: detect (CPU flags), verify (probe), cache, choose; each form exact.

Nothing here depends on the CPU it runs on: each form is forced and checked exactly
against an int64 reference (where this CPU cannot run one exactly, the test checks
that quantlab refuses it instead), and the automatic choice is tested by injecting
probe outcomes.
"""
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab.errors import QuantlabError
from quantlab.runtimes.onnxruntime import forms as ort_forms
from quantlab.runtimes.onnxruntime.forms import OrtFormError
from quantlab.runtimes.onnxruntime.forms import (
    PROBED_OPS, VARIANTS, OpOutcome, ProbeResult, choose_form, read_cache, read_cpu_info, resolve_form, write_cache,
)
from quantlab.runtimes.onnxruntime.probe import conv_reference, probe_inputs, probe_references
from quantlab.runtimes.onnxruntime.verify import integer_kernels, verify_model
from quantlab.export.qdq import export_int8
from quantlab.runtimes.onnxruntime.runner import OnnxRuntimeRunner, quantized_kernels

AVX2_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2
"""
VNNI_XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: sse4_2 avx avx2 avx512f avx512bw avx512_vnni amx_int8 avx_vnni
"""


def fake_probe(inexact=(), error=31003):
    """This CPU's probe result with the given ``(variant, op)`` outcomes made inexact."""
    import onnxruntime as ort

    outcomes = {v: {op: OpOutcome(True, 0) for op in PROBED_OPS} for v in VARIANTS}
    for variant, op in inexact:
        outcomes[variant][op] = OpOutcome(False, error)
    return ProbeResult(read_cpu_info(), ort.__version__, outcomes, "2026-12-02T00:00:00+00:00", 0.5)


@pytest.fixture(scope="module")
def probe_here():
    """The real probe of this CPU (through ONNX Runtime; about a second)."""
    return ort_forms.probe()


# -- detect --------------------------------------------------------------------------------

def test_cpu_flags_are_read_from_any_cpuinfo_text():
    avx2 = read_cpu_info(AVX2_EPYC)
    assert avx2.model == "AMD EPYC 7B12" and avx2.flags == ("avx2",) and avx2.vnni is False
    assert "no VNNI" in avx2.describe()
    vnni = read_cpu_info(VNNI_XEON)
    assert vnni.vnni is True and {"avx512_vnni", "amx_int8", "avx_vnni"} <= set(vnni.flags)
    assert avx2.flags_digest != vnni.flags_digest
    unknown = read_cpu_info("")
    assert unknown.vnni is None and not unknown.flags_known and "flags unknown" in unknown.describe()
    arm = read_cpu_info("Features\t: fp asimd asimddp\nCPU part\t: 0xd0c\n")
    assert arm.flags_known and arm.vnni is False and arm.flags == ()


def test_cpu_info_of_a_missing_file_is_unknown_not_an_error(tmp_path):
    assert read_cpu_info(path=str(tmp_path / "cpuinfo")).flags_known is False


# -- verify: the probe ---------------------------------------------------------------------

def _saturating_u8s8(a_u8, b_s8, offset):
    """What an x86 kernel without VNNI computes: u8 x s8 pairs (k, k+1) added into a saturating
    int16 (vpmaddubsw), then int32 sums; ``offset`` shifts which neighbours pair up."""
    products = a_u8[:, :, None] * b_s8[None, :, :]
    k = 0
    out = np.zeros((a_u8.shape[0], b_s8.shape[1]), np.int64)
    if offset:
        out += products[:, 0]
        k = 1
    while k < a_u8.shape[1]:
        out += np.clip(products[:, k : k + 2].sum(1), -32768, 32767)
        k += 2
    return out - 128 * b_s8.sum(0)  # the activation zero point, applied exactly


@pytest.mark.parametrize("offset", [0, 1])
def test_probe_data_exposes_a_kernel_that_saturates_16_bit_pairs(offset):
    data = probe_inputs(8)
    exact = probe_references(data)["MatMulInteger/8"]
    assert np.array_equal((data["gemm_a"] - 128) @ data["gemm_b"], exact)
    wrong = _saturating_u8s8(data["gemm_a"], data["gemm_b"], offset)
    assert np.abs(wrong - exact).max() > 30000  # every structured column saturates
    # 7-bit weights: 255 * 63 * 2 < 32768, the same kernel is exact.
    data7 = probe_inputs(7)
    assert np.array_equal(_saturating_u8s8(data7["gemm_a"], data7["gemm_b"], offset), probe_references(data7)["MatMulInteger/8"])
    assert np.abs(data7["gemm_b"]).max() == 63 and np.abs(data["gemm_b"]).max() == 127


def test_probe_conv_data_holds_saturating_pairs_at_full_range():
    data = probe_inputs(8)
    assert data["conv_x"].min() == 0 and data["conv_x"].max() == 255 and np.all(data["conv_x"][0] == 255)
    for name in ("conv_w", "conv1x1_w", "depthwise_w"):
        w = data[name].reshape(data[name].shape[0], -1)
        # (+127, +127) neighbours at an even and at an odd offset of the reduction axis
        assert any(np.any((w[o, 0::2][: w.shape[1] // 2] == 127) & (w[o, 1::2][: w.shape[1] // 2] == 127)) for o in range(8))
        assert any(np.any((w[o, 1:-1:2] == 127) & (w[o, 2::2][: len(w[o, 1:-1:2])] == 127)) for o in range(8))
    # the structured channels' exact sums stay mid-range, so a saturated one cannot hide in clipping
    assert np.all(probe_references(data)["QLinearConv/1x1"][0, :16] == 128)


def test_probe_through_onnx_runtime_agrees_with_the_cpu_flags(probe_here):
    assert set(probe_here.outcomes) == set(VARIANTS)
    # u8u8 and s8s8 widen to 16 bits before multiplying, 7-bit weights cannot saturate: exact on any x86 CPU.
    for variant in ("u8u8", "u8s8-w7", "s8s8"):
        assert not probe_here.inexact_ops(*VARIANTS[variant]), probe_here.describe()
    if probe_here.cpu.vnni is not None:  # detect and verify agree: VNNI <=> exact u8s8 (else off by thousands)
        assert probe_here.exact("u8s8") == probe_here.cpu.vnni, probe_here.describe()
        for _, outcome in probe_here.inexact_ops("u8s8"):
            assert outcome.max_abs_error > 1000


# -- choose (injected probe outcomes, so every branch runs on any CPU) ----------------------

def test_auto_picks_u8s8_where_exact_else_u8u8_else_qdq_float():
    assert choose_form(fake_probe()) == "u8s8"
    assert choose_form(fake_probe([("u8s8", "QLinearConv")])) == "u8u8"
    assert choose_form(fake_probe([("u8s8", "MatMulIntegerToFloat")])) == "u8u8"
    assert choose_form(fake_probe([("u8s8", "QLinearConv"), ("u8u8", "ConvInteger")])) == "qdq-float"
    # 7-bit weights (asked for): an AVX2-only CPU keeps the u8s8 kernels
    assert choose_form(fake_probe([("u8s8", "QLinearConv")]), weight_bits=7) == "u8s8"


def test_resolve_form_honours_a_forced_form_and_says_it_is_not_exact_here():
    inexact = fake_probe([("u8s8", "QLinearConv")])
    forced = resolve_form("u8s8", probe_result=inexact)
    assert forced.form == "u8s8" and forced.requested == "u8s8" and not forced.exact_here
    auto = resolve_form("auto", probe_result=inexact)
    assert auto.form == "u8u8" and auto.exact_here and auto.to_dict()["requested"] == "auto"
    assert resolve_form("auto", reduce_range=True, probe_result=inexact).to_dict()["weight_bits"] == 7
    with pytest.raises(OrtFormError, match="must be one of auto, u8s8, u8u8, qdq-float"):
        resolve_form("s8s8", probe_result=inexact)


def test_the_probe_overrides_the_flags_when_they_disagree(monkeypatch, caplog):
    """Detect predicts, verify decides: flags promising VNNI do not make a saturating u8s8 exact."""
    def fake_variant(form, weight_bits=8):
        bad = form == "u8s8" and weight_bits == 8
        return {op: OpOutcome(not bad, 31003 if bad else 0) for op in PROBED_OPS}

    monkeypatch.setattr(ort_forms, "probe_variant", fake_variant)
    with caplog.at_level("WARNING", logger="quantlab.runtimes.onnxruntime.forms"):
        result = ort_forms.probe(read_cpu_info(VNNI_XEON))
    assert result.cpu.vnni and not result.exact("u8s8") and choose_form(result) == "u8u8"
    assert "trusting the probe" in caplog.text


@pytest.mark.parametrize("inexact, form", [
    ((), "u8s8"),
    ((("u8s8", "QLinearConv"),), "u8u8"),
    ((("u8s8", "QLinearConv"), ("u8u8", "MatMulIntegerToFloat")), "qdq-float"),
])
def test_auto_export_writes_the_form_the_probe_allows(inexact, form, worst_case, tmp_path, monkeypatch):
    model, inputs, _ = worst_case
    monkeypatch.setattr(ort_forms, "cached_probe", lambda **_: fake_probe(inexact))
    result = export_int8(model, tmp_path / "auto.onnx", inputs[:2], target="ort-cpu")
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert (meta["quantlab.ort_int8"], meta["quantlab.ort_int8.requested"]) == (form, "auto")
    assert result.ort_int8["exact_here"] and result.ort_int8["form"] == form
    forms = {k.form for k in integer_kernels(onnx.load(str(result.path)))}
    assert forms == ({form} if form != "qdq-float" else set())


# -- the cache -----------------------------------------------------------------------------

def test_cache_round_trip_and_other_entries_kept(tmp_path):
    path = tmp_path / "quantlab" / "ort_int8_probe.json"
    result = fake_probe([("u8s8", "ConvInteger")])
    other = ProbeResult(read_cpu_info(AVX2_EPYC), "1.20.0", result.outcomes, result.probed_at, 0.1)
    assert write_cache(path, other) and write_cache(path, result)
    assert read_cache(path, result.key) == result and read_cache(path, other.key) == other
    assert read_cache(path, "no such key") is None
    assert json.loads(path.read_text())["format"] == "quantlab.ort_int8_probe"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers


def _entry(result):
    return json.loads(json.dumps(result.to_dict()))


BAD_ENTRIES = {
    "exact is a string": lambda e: e["outcomes"]["u8s8"]["QLinearConv"].update(exact="yes"),
    "exact contradicts the error": lambda e: e["outcomes"]["u8s8"]["QLinearConv"].update(max_abs_error=5),
    "error is a float": lambda e: e["outcomes"]["u8u8"]["MatMulInteger"].update(max_abs_error=0.0),
    "error below -1": lambda e: e["outcomes"]["u8u8"]["MatMulInteger"].update(exact=False, max_abs_error=-7),
    "error a bool": lambda e: e["outcomes"]["u8u8"]["MatMulInteger"].update(max_abs_error=False),
    "variant missing": lambda e: e["outcomes"].pop("u8u8"),
    "op missing": lambda e: e["outcomes"]["s8s8"].pop("ConvInteger"),
    "unknown op": lambda e: e["outcomes"]["s8s8"].update(Winograd={"exact": True, "max_abs_error": 0}),
    "outcome not an object": lambda e: e["outcomes"]["u8s8"].update(QLinearConv=[True, 0]),
    "digest not hex": lambda e: e.update(flags_digest="zz" * 8),
    "unknown flag": lambda e: e.update(cpu_flags=["avx2", "<script>"]),
    "seconds NaN": lambda e: e.update(seconds=float("nan")),
    "seconds negative": lambda e: e.update(seconds=-1),
    "probed_at garbage": lambda e: e.update(probed_at="yesterday"),
    "model empty": lambda e: e.update(cpu_model=""),
    "flags_known a string": lambda e: e.update(flags_known="true"),
    "version another": lambda e: e.update(onnxruntime="0.0.1"),  # then it does not match its key
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_a_bad_cache_entry_is_ignored(case, tmp_path):
    result = fake_probe()
    entry = _entry(result)
    BAD_ENTRIES[case](entry)
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({"format": "quantlab.ort_int8_probe", "version": 1, "entries": {result.key: entry}}))
    assert read_cache(path, result.key) is None


@pytest.mark.parametrize("content", [
    b"{not json", b"\xff\xfe\x00garbage", b"[]", b'{"format": "other", "version": 1, "entries": {}}',
    b'{"format": "quantlab.ort_int8_probe", "version": 99, "entries": {}}',
    b'{"format": "quantlab.ort_int8_probe", "version": 1, "entries": []}', b"",
], ids=["truncated", "binary", "list", "format", "version", "entries", "empty"])
def test_a_garbage_cache_file_makes_the_cpu_probe_again(content, tmp_path, monkeypatch):
    path = tmp_path / "probe.json"
    path.write_bytes(content)
    calls = []
    fresh = fake_probe([("u8s8", "QLinearConv")])
    monkeypatch.setattr(ort_forms, "probe", lambda cpu=None: calls.append(1) or fresh)
    monkeypatch.setattr(ort_forms, "_MEMO", {})
    assert ort_forms.cached_probe(path=path) == fresh and calls == [1]
    monkeypatch.setattr(ort_forms, "_MEMO", {})  # a new process: the rewritten file is valid now
    assert ort_forms.cached_probe(path=path) == fresh and calls == [1]


def test_an_unwritable_cache_does_not_stop_the_probe(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("QUANTLAB_CACHE", str(blocker / "quantlab"))
    monkeypatch.setattr(ort_forms, "probe", lambda cpu=None: fake_probe())
    monkeypatch.setattr(ort_forms, "_MEMO", {})
    assert ort_forms.cached_probe().exact("u8s8")
    assert not write_cache(ort_forms.cache_file(), fake_probe())


# -- each form, forced, exactly against an int64 reference ----------------------------------

S_X, S_W1, S_2, S_W2, S_3, S_W3 = 2.0**-4, 2.0**-7, 2.0**-1, 2.0**-7, 4.0, 2.0**-7
PATTERN = np.array([1, 1, 1, 1, -1, 0, -1, 0, -1, 0, -1, 0])


class WorstCaseNet(nn.Module):
    """conv1 -> ReLU -> quantizer (QLinearConv), conv2 -> flatten (integer GEMM over im2col
    patches: no quantizer right after it), fc (MatMulIntegerToFloat)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(24, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 5 * 5, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv2(torch.relu(self.conv1(x))), 1))


def _extremes(rng, shape, low, high):
    pick = rng.random(shape)
    values = rng.integers(low, high + 1, size=shape)
    return np.where(pick < 0.6, high, np.where(pick < 0.75, low, values)).astype(np.int64)


def _worst_case_integers():
    """Integer weights, biases (multiples of their accumulator's scale) and inputs."""
    rng = np.random.default_rng(0)
    w1 = _extremes(rng, (16, 24, 3, 3), -127, 127)
    for o in range(10):  # u8 255 x (+127, +127) neighbours along the input channels
        w1[o] = (np.roll(np.resize(PATTERN, 24), o) * (1 if o < 5 else -1) * 127).reshape(24, 1, 1)
    w2 = _extremes(rng, (8, 16, 1, 1), -127, 127)
    w2[:4, :, 0, 0] = np.resize(PATTERN, 16) * 127
    w3 = _extremes(rng, (10, 200), -127, 127)
    w3[:4] = np.resize(PATTERN, 200) * 127
    x = _extremes(rng, (3, 24, 5, 5), -128, 127)
    x[0] = 127  # u8 255 everywhere
    x[2] = np.where(np.arange(24)[:, None, None] % 2 == 0, 127, -128)
    biases = (rng.integers(-2000, 2000, 16) + 20000, rng.integers(-500, 500, 8), rng.integers(-500, 500, 10))
    return w1, w2, w3, biases, x


def _int64_reference(w1, w2, w3, biases, x):
    """The network on integers: exact accumulators, power-of-two requantization (rint half-even)."""
    acc1 = conv_reference(x + 128, w1, 1, 1) + biases[0][None, :, None, None]
    q2 = np.maximum(np.clip(np.rint(acc1 * (S_X * S_W1 / S_2)), -128, 127), 0).astype(np.int64)
    acc2 = conv_reference(q2 + 128, w2, 0, 1) + biases[1][None, :, None, None]
    q3 = np.clip(np.rint(acc2.reshape(len(x), -1) * (S_2 * S_W2 / S_3)), -128, 127).astype(np.int64)
    acc3 = q3 @ w3.T + biases[2]
    return (acc3 * (S_3 * S_W3)).astype(np.float32), acc3


@pytest.fixture(scope="module")
def worst_case():
    w1, w2, w3, biases, x = _worst_case_integers()
    model = WorstCaseNet().eval()
    with torch.no_grad():  # float weights on the grid (q * s); biases on their accumulator's grid (b * s_in * s_w)
        for layer, w, s_in, s_w, b in ((model.conv1, w1, S_X, S_W1, biases[0]), (model.conv2, w2, S_2, S_W2, biases[1]),
                                       (model.fc, w3, S_3, S_W3, biases[2])):
            layer.weight.copy_(torch.from_numpy(w * s_w))
            layer.bias.copy_(torch.from_numpy(b * (s_in * s_w)))
    inputs = torch.from_numpy((x * S_X).astype(np.float32))
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(inputs))
    for name, s_in, s_w in (("conv1", S_X, S_W1), ("conv2", S_2, S_W2), ("fc", S_3, S_W3)):
        ql.set_quantizer_amax(model, name, "input", torch.tensor(127 * s_in))
        channels = getattr(model, name).weight.shape[0]
        ql.set_quantizer_amax(model, name, "weight", torch.full((channels,), 127 * s_w))
    logits, acc3 = _int64_reference(w1, w2, w3, biases, x)
    assert np.abs(acc3).max() < 2**24  # float32 holds every accumulator exactly
    # The inputs are worst cases: conv1 over im2col patches (K = tap-major, channels fastest, as
    # ORT's NHWC kernels) on a kernel that saturates 16-bit u8 x s8 pairs is off by thousands.
    padded = np.pad(x + 128, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=128)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N, C, H, W, 3, 3
    patches = windows.transpose(0, 2, 3, 4, 5, 1).reshape(-1, 9 * 24)
    weights = w1.transpose(2, 3, 1, 0).reshape(9 * 24, 16)
    assert np.abs(_saturating_u8s8(patches, weights, 0) - (patches - 128) @ weights).max() > 30000
    return model, inputs, logits


@pytest.mark.parametrize("form", ["u8s8", "u8u8", "qdq-float", "tensorrt"])
def test_each_form_computes_the_exact_integer_result(form, worst_case, probe_here, tmp_path, monkeypatch):
    model, inputs, expected = worst_case
    monkeypatch.setattr(ort_forms, "cached_probe", lambda **_: probe_here)
    kwargs = {} if form == "tensorrt" else {"target": "ort-cpu", "ort_int8": form}
    result = export_int8(model, tmp_path / f"{form}.onnx", inputs[:2], **kwargs)
    kernels = quantized_kernels(result.path)
    if form in ("u8s8", "u8u8"):
        assert kernels == {"QLinearConv": 1, "MatMulIntegerToFloat": 2}
        weight_types = {str(onnx.numpy_helper.to_array(t).dtype) for t in onnx.load(str(result.path)).graph.initializer
                        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) >= 2}
        assert weight_types == {"int8" if form == "u8s8" else "uint8"}
    else:
        assert kernels == {}  # float kernels only (the TensorRT form: QDQ fusion off)
    if form == "u8s8" and not probe_here.exact("u8s8"):
        with pytest.raises(OrtFormError, match="u8s8 is not exact on this CPU"):
            OnnxRuntimeRunner(result.path)
        return
    with OnnxRuntimeRunner(result.path, threads=1) as runner:
        got = runner.run(inputs.numpy())[0]
    np.testing.assert_array_equal(got, expected)


def test_seven_bit_weights_only_when_asked_and_recorded(worst_case, tmp_path, monkeypatch):
    model, inputs, _ = worst_case
    monkeypatch.setattr(ort_forms, "cached_probe", lambda **_: fake_probe([("u8s8", "QLinearConv")]))
    result = export_int8(model, tmp_path / "w7.onnx", inputs[:2], target="ort-cpu", ort_reduce_range=True)
    proto = onnx.load(str(result.path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["quantlab.ort_int8"] == "u8s8" and meta["quantlab.ort_int8.weight_bits"] == "7"
    kernels = integer_kernels(proto)
    assert kernels and {k.weight_bits for k in kernels} == {7}
    verify_model(proto, "w7.onnx", probe_result=fake_probe([("u8s8", "QLinearConv")]))  # 7-bit u8s8 is exact there
    default = export_int8(model, tmp_path / "w8.onnx", inputs[:2], target="ort-cpu")
    assert {p.key: p.value for p in onnx.load(str(default.path)).metadata_props}["quantlab.ort_int8.weight_bits"] == "8"
    with pytest.raises(QuantlabError, match="target='ort-cpu' only"):
        export_int8(model, tmp_path / "trt.onnx", inputs[:2], ort_reduce_range=True)


# -- refusing a file whose recorded form is not exact here ----------------------------------

@pytest.fixture(scope="module")
def u8s8_file(worst_case, tmp_path_factory):
    model, inputs, _ = worst_case
    path = tmp_path_factory.mktemp("forms") / "model.u8s8.onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ort_forms, "cached_probe", lambda **_: fake_probe())
        export_int8(model, path, inputs[:2], target="ort-cpu", ort_int8="u8s8")
    return path


def test_a_recorded_form_not_exact_here_is_refused_with_the_layer_kind_and_the_fix(u8s8_file):
    model = onnx.load(str(u8s8_file))
    with pytest.raises(OrtFormError) as info:
        verify_model(model, str(u8s8_file), probe_result=fake_probe([("u8s8", "QLinearConv")]))
    message = str(info.value)
    assert "\n" not in message and "model.u8s8.onnx" in message
    assert "QLinearConv u8s8 is not exact on this CPU" in message and "off by 31003" in message
    assert "--ort-int8 u8u8" in message and "records form u8s8 (forced" in message
    # the GEMM kernels are named when they are the inexact ones
    with pytest.raises(OrtFormError, match="MatMulIntegerToFloat u8s8 is not exact"):
        verify_model(model, "m.onnx", probe_result=fake_probe([("u8s8", "MatMulIntegerToFloat")]))
    report = verify_model(model, "m.onnx", probe_result=fake_probe())
    assert report.form == "u8s8" and "exact on this CPU" in report.describe()


def test_cli_run_refuses_a_file_from_a_vnni_machine_on_an_avx2_cpu(u8s8_file, tmp_path, monkeypatch, capsys):
    """The AVX2 machine simulated through the real cache file: this CPU's entry says u8s8 saturates."""
    from quantlab.cli.main import main

    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ort_forms, "_MEMO", {})
    write_cache(ort_forms.cache_file(), fake_probe([("u8s8", "QLinearConv"), ("u8s8", "MatMulIntegerToFloat")]))
    store = tmp_path / "runs.sqlite"
    code = main(["run", str(u8s8_file), "--data", "fmnist:test[:8]", "--store", str(store)])
    captured = capsys.readouterr()
    assert code == 1 and not store.exists()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("quantlab run: error:") and "u8s8 is not exact on this CPU" in line and "--ort-int8 u8u8" in line
    assert "top-1" not in captured.out  # no number was printed


def test_bad_recorded_metadata_is_a_clear_error(u8s8_file, tmp_path):
    from quantlab.export.mapping import set_metadata

    model = onnx.load(str(u8s8_file))
    set_metadata(model, {"quantlab.ort_int8": "u4s4"})
    with pytest.raises(OrtFormError, match="quantlab.ort_int8 is 'u4s4', not one of u8s8, u8u8, qdq-float"):
        verify_model(model, "bad.onnx", probe_result=fake_probe())
    set_metadata(model, {"quantlab.ort_int8": "u8u8", "quantlab.ort_int8.weight_bits": "6"})
    with pytest.raises(OrtFormError, match="weight_bits is '6'"):
        verify_model(model, "bad.onnx", probe_result=fake_probe())


def test_integer_kernels_of_the_tensorrt_form_follow_the_session(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()  # on a 3-D input: DQ -> MatMul, which ORT fuses
    x = torch.randn(4, 3, 16)
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(x))
    proto = onnx.load(str(export_int8(model, tmp_path / "trt.onnx", x).path))
    assert integer_kernels(proto, qdq_fusion=False) == []  # how quantlab runs the TensorRT form: float kernels
    # With ORT's QDQ fusion on, x86 turns the INT8 activations into UINT8 (u8 x s8 kernels).
    (fused,) = integer_kernels(proto, machine="x86_64")
    assert (fused.op, fused.form, fused.fused) == ("MatMulIntegerToFloat", "u8s8", True)
    assert [k.form for k in integer_kernels(proto, machine="aarch64")] == ["s8s8"]
    with pytest.raises(OrtFormError, match="MatMulIntegerToFloat u8s8 is not exact.*fuses it from the file's Q/DQ"):
        verify_model(proto, "trt.onnx", probe_result=fake_probe([("u8s8", "MatMulIntegerToFloat")]))
    with OnnxRuntimeRunner(tmp_path / "trt.onnx") as runner:  # quantlab's runner: QDQ fusion off, nothing to refuse
        assert not runner.qdq_fusion and runner.int8_form.kernels == []
