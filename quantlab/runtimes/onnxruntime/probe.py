"""The worst-case integer probe of ONNX Runtime's x86 integer kernels (verify, for ``ort_forms``).

One tiny ONNX model per form (activation x weight types) holds every integer op the
ort-cpu forms run (:data:`PROBED_OPS`: QLinearConv dense / 1x1 / depthwise,
ConvInteger, MatMulInteger and MatMulIntegerToFloat at M = 8 and M = 1), with weights
as initializers (ONNX Runtime prepacks them as in a real model). Its data is the
worst case for a kernel that adds neighbouring u8 x s8 products in a saturating 16-bit
sum: u8 activations at 255 against (+127, +127) weight neighbours, at even AND odd
offsets of the reduction axis, in zero-sum patterns that keep every exact result
mid-range (so a saturated one cannot hide in the output's clipping), plus random
full-range values. Each output is compared with the exact int64 result.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Mapping, Optional

import numpy as np

logger = logging.getLogger(__name__)

#: Integer ops the ort-cpu forms run (QLinearConv: fused by ORT from DQ -> Conv -> Q).
PROBED_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat")
WEIGHT_LIMIT = {8: 127, 7: 63}


@dataclasses.dataclass(frozen=True)
class OpOutcome:
    """One op's probe: exact, or off by ``max_abs_error`` (int32 units; output steps for
    QLinearConv; -1 when ONNX Runtime could not run it)."""

    exact: bool
    max_abs_error: int


# Along the reduction axis: zero sum, and (+L, +L) pairs at even AND odd offsets, so a
# kernel that adds neighbouring u8 x s8 products in 16 bits saturates whichever way it
# pairs them, while every exact sum stays small (outputs far from their clipping range).
_PERIOD = np.array([1, 1, 1, 1, -1, 0, -1, 0, -1, 0, -1, 0], dtype=np.int64)
_GEMM_K, _GEMM_N, _CONV_C, _CONV_HW = 96, 24, 24, 5
#: QLinearConv output scale: a power of two, so requantization is exact in float32.
QLINEAR_OUTPUT_SCALE = 4096.0
_MAX_ERROR = 2**31 - 1


def _pattern(length: int, limit: int, sign: int, shift: int) -> np.ndarray:
    return np.roll(np.resize(_PERIOD, length), shift) * sign * limit


def _extremes(rng: np.random.Generator, shape, low: int, high: int, p_high: float, p_low: float) -> np.ndarray:
    """Values mostly at the ends of [low, high] (where products are largest), some in between."""
    pick = rng.random(shape)
    values = rng.integers(low, high + 1, size=shape)
    values = np.where(pick < p_high, high, values)
    return np.where((pick >= p_high) & (pick < p_high + p_low), low, values).astype(np.int64)


def probe_inputs(weight_bits: int = 8, seed: int = 0) -> Dict[str, np.ndarray]:
    """The probe's integer data (int64): worst-case u8 activations and signed weights.

    Keys: ``gemm_a`` [8, K] and ``gemm_a1`` [1, K] (u8), ``gemm_b`` [K, N];
    ``conv_x`` [2, C, 5, 5] (u8), ``conv_w`` [C, C, 3, 3], ``conv1x1_w`` [C, C, 1, 1],
    ``depthwise_w`` [C, 1, 3, 3]. Weights lie in [-L, L], L = 127 (63 for 7 bits).
    """
    limit = WEIGHT_LIMIT[weight_bits]
    rng = np.random.default_rng(seed)
    gemm_a = _extremes(rng, (8, _GEMM_K), 0, 255, 0.5, 0.1)
    gemm_a[0], gemm_a[1], gemm_a[2] = 255, 0, np.resize([255, 0], _GEMM_K)
    gemm_b = _extremes(rng, (_GEMM_K, _GEMM_N), -limit, limit, 0.3, 0.3)
    for n in range(6):
        gemm_b[:, n] = _pattern(_GEMM_K, limit, 1, n)
        gemm_b[:, 6 + n] = _pattern(_GEMM_K, limit, -1, n)
    conv_x = _extremes(rng, (2, _CONV_C, _CONV_HW, _CONV_HW), 0, 255, 0.5, 0.1)
    conv_x[0] = 255
    weights = {}
    for name, taps in (("conv_w", 3), ("conv1x1_w", 1)):
        w = _extremes(rng, (_CONV_C, _CONV_C, taps, taps), -limit, limit, 0.3, 0.3)
        for o in range(16):  # the pattern along the input channels, the same at every tap
            w[o] = _pattern(_CONV_C, limit, 1 if o < 8 else -1, o % 8).reshape(-1, 1, 1)
        weights[name] = w
    depthwise = _extremes(rng, (_CONV_C, 1, 3, 3), -limit, limit, 0.3, 0.3)
    for c in range(16):  # the pattern along the taps of one channel
        depthwise[c, 0] = _pattern(9, limit, 1 if c < 8 else -1, c % 3).reshape(3, 3)
    return {"gemm_a": gemm_a, "gemm_a1": gemm_a[:1].copy(), "gemm_b": gemm_b, "conv_x": conv_x, **weights,
            "depthwise_w": depthwise}


def conv_reference(x_u8: np.ndarray, w: np.ndarray, pad: int, groups: int) -> np.ndarray:
    """Exact int64 (stride 1, groups 1 or depthwise) ``conv(x - 128, w)`` (stride 1; padding holds the zero point)."""
    x = np.pad(x_u8 - 128, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # N, C, H, W, kh, kw
    if groups == 1:
        return np.einsum("nchwij,ocij->nohw", windows, w)
    return np.einsum("nchwij,cij->nchw", windows, w[:, 0])


def probe_references(data: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The exact results of every probe output (int64; QLinearConv as its u8 output)."""
    acc_a = (data["gemm_a"] - 128) @ data["gemm_b"]
    acc_a1 = (data["gemm_a1"] - 128) @ data["gemm_b"]

    def requantized(acc: np.ndarray) -> np.ndarray:  # acc / 4096 is exact in float64; rint is half-even as MLAS
        return np.clip(np.rint(acc / QLINEAR_OUTPUT_SCALE) + 128, 0, 255).astype(np.int64)

    conv = conv_reference(data["conv_x"], data["conv_w"], 1, 1)
    return {
        "MatMulInteger/8": acc_a, "MatMulInteger/1": acc_a1,
        "MatMulIntegerToFloat/8": acc_a, "MatMulIntegerToFloat/1": acc_a1,
        "ConvInteger/3x3": conv,
        "QLinearConv/3x3": requantized(conv),
        "QLinearConv/1x1": requantized(conv_reference(data["conv_x"], data["conv1x1_w"], 0, 1)),
        "QLinearConv/depthwise": requantized(conv_reference(data["conv_x"], data["depthwise_w"], 1, _CONV_C)),
    }


def build_probe_model(form: str, weight_bits: int = 8, data: Optional[Mapping[str, np.ndarray]] = None):
    """The probe as one ONNX model: every op of :data:`PROBED_OPS` with ``form``'s types,
    weights as initializers (so ONNX Runtime prepacks them as in a real model), one
    output each. Returns the model and its feeds."""
    from onnx import TensorProto, helper, numpy_helper

    data = dict(data) if data is not None else probe_inputs(weight_bits)
    unsigned = form == "u8u8"
    signed_activations = form == "s8s8"  # x - 128: the same values with zero point 0
    a_type = np.int8 if signed_activations else np.uint8
    a_elem = TensorProto.INT8 if signed_activations else TensorProto.UINT8
    w_type = np.uint8 if unsigned else np.int8

    def weight(values: np.ndarray) -> np.ndarray:
        return (values + 128).astype(np.uint8) if unsigned else values.astype(np.int8)

    w_zero = np.array(128 if unsigned else 0, dtype=w_type)
    inits = {
        "gemm_b": weight(data["gemm_b"]), "conv_w": weight(data["conv_w"]), "conv1x1_w": weight(data["conv1x1_w"]),
        "depthwise_w": weight(data["depthwise_w"]), "w_zero": w_zero,
        "w_zero_channels": np.full(_CONV_C, w_zero, dtype=w_type),
        "x_zero": np.array(0 if signed_activations else 128, dtype=a_type), "one": np.array(1.0, dtype=np.float32),
        "ones_channels": np.ones(_CONV_C, dtype=np.float32),
        "y_scale": np.array(QLINEAR_OUTPUT_SCALE, dtype=np.float32),
        "y_zero": np.array(0 if signed_activations else 128, dtype=a_type),
    }
    nodes, outputs = [], []

    def add(op: str, inputs: List[str], out: str, elem: int, domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        outputs.append(helper.make_tensor_value_info(out, elem, None))

    for a in ("gemm_a", "gemm_a1"):
        rows = a[len("gemm_a"):] or "8"
        add("MatMulInteger", [a, "gemm_b", "x_zero", "w_zero"], f"MatMulInteger/{rows}", TensorProto.INT32)
        add("MatMulIntegerToFloat", [a, "gemm_b", "one", "one", "x_zero", "w_zero"], f"MatMulIntegerToFloat/{rows}",
            TensorProto.FLOAT, domain="com.microsoft")
    add("ConvInteger", ["conv_x", "conv_w", "x_zero", "w_zero"], "ConvInteger/3x3", TensorProto.INT32, pads=[1, 1, 1, 1])
    for name, w, pad, group in (("3x3", "conv_w", 1, 1), ("1x1", "conv1x1_w", 0, 1), ("depthwise", "depthwise_w", 1, _CONV_C)):
        add("QLinearConv", ["conv_x", "one", "x_zero", w, "ones_channels", "w_zero_channels", "y_scale", "y_zero"],
            f"QLinearConv/{name}", a_elem, pads=[pad] * 4, group=group)
    inputs = [helper.make_tensor_value_info(name, a_elem, list(data[name].shape)) for name in ("gemm_a", "gemm_a1", "conv_x")]
    graph = helper.make_graph(nodes, f"quantlab_ort_int8_probe_{form}_w{weight_bits}", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = min(model.ir_version, 9)
    shift = 128 if signed_activations else 0
    return model, {name: (data[name] - shift).astype(a_type) for name in ("gemm_a", "gemm_a1", "conv_x")}


def probe_variant(form: str, weight_bits: int = 8) -> Dict[str, OpOutcome]:
    """Runs the probe of one form through ONNX Runtime (CPU, 1 thread, all graph optimizations)."""
    import onnxruntime as ort

    data = probe_inputs(weight_bits)
    references = probe_references(data)
    model, feeds = build_probe_model(form, weight_bits, data)
    errors: Dict[str, int] = {}
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(None, feeds)))
    except Exception as exc:  # noqa: BLE001 - an unsupported type in this ORT build: the form is unusable here
        logger.warning("ONNX Runtime could not run the %s probe (%s): treating the form as inexact", form, str(exc)[:200])
        return {op: OpOutcome(False, -1) for op in PROBED_OPS}
    for name, expected in references.items():
        got = np.asarray(results[name]).astype(np.float64)
        if form == "s8s8" and name.startswith("QLinearConv"):
            got = got + 128  # an INT8 output with zero point 0: the UINT8 reference minus 128
        if got.shape != expected.shape or not np.all(np.isfinite(got)):
            error = _MAX_ERROR
        else:
            error = int(min(np.ceil(np.abs(got - expected).max()), _MAX_ERROR))
        op = name.split("/")[0]
        errors[op] = max(errors.get(op, 0), error)
    return {op: OpOutcome(errors[op] == 0, errors[op]) for op in PROBED_OPS}


__all__ = [
    "PROBED_OPS", "QLINEAR_OUTPUT_SCALE", "WEIGHT_LIMIT", "OpOutcome", "build_probe_model", "conv_reference",
    "probe_inputs", "probe_references", "probe_variant",
]
