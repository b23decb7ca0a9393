"""``--target ort-cpu``: the same INT8 model, in the form ONNX Runtime runs fast on x86 CPUs.

ONNX Runtime's x86 integer kernels (MLAS, VNNI) are fast for UINT8 activations
and INT8 weights; with INT8 activations a Q/DQ model is often SLOWER than FP32.
Symmetric INT8 with zero point 0 and UINT8 with zero point 128 are the same
grid (``q_u8 = q_s8 + 128``), so the TensorRT graph is rewritten with the SAME
scales and the same numerics:

1. every activation Q/DQ gets a UINT8 zero point of 128;
2. a Conv whose output reaches the next quantizer only through Relu / MaxPool
   becomes ``Conv -> Q -> Clip(128, 255) [-> MaxPool]``: Relu on the integer grid
   is ``max(q, 128)``, ``Q(relu(y)) == max(Q(y), 128)`` exactly, and MaxPool
   commutes with the monotone Q, so ORT fuses DQ -> Conv -> Q into one ``QLinearConv``;
3. any other quantized Conv (e.g. one feeding a residual Add, whose output has no
   quantizer, so it must produce float) is lowered as chosen by ``other_convs``:

   * ``"im2col"`` (default): the UINT8 input is unfolded with Transpose/Pad/Slice/
     Concat and multiplied by ``MatMulIntegerToFloat`` (MLAS integer GEMM, exact
     integer accumulation, ``* s_x * s_w + bias`` in its epilogue), then Transposed back;
   * ``"float"``: ``DQ(x) -> Conv`` with a float weight initializer holding exactly
     the dequantized values ``q * s`` (prepacked by ONNX Runtime like FP32);
   * ``"conv-integer"``: ``ConvInteger -> Cast -> Mul -> Add`` (exact, but ONNX
     Runtime 1.30-1.32's ConvInteger kernel measured 4-5x slower than its float Conv);
4. Gemm / MatMul with quantized inputs become ``MatMulIntegerToFloat`` (an ONNX
   Runtime contrib op: integer GEMM with the scales and bias applied in its epilogue).

ConvTranspose keeps its Q/DQ form (ONNX Runtime has no integer ConvTranspose).
This form is for ONNX Runtime only: TensorRT rejects UINT8 inside a network.

The integer weights take one of three forms (``form``; chosen per CPU by
:mod:`quantlab.runtimes.onnxruntime.forms`), all computing the same numbers where exact:

* ``"u8s8"``: INT8 weights, zero point 0 (as above);
* ``"u8u8"``: the weights every integer kernel reads stored as UINT8 ``q + 128`` with
  zero point 128 (exact on x86 CPUs without VNNI, where u8 x s8 saturates);
* ``"qdq-float"``: no integer kernels: every quantized Conv/ConvTranspose/Gemm/MatMul
  gets a float weight holding exactly ``q * s``, and its input dequantized by
  Cast/Sub/Mul (the same numbers as DequantizeLinear, which ONNX Runtime would fuse).

``weight_bits=7`` (reduce_range, only when the user asks) first requantizes the
weights of Conv/Gemm/MatMul to [-63, 63] with scale ``s * 127 / 63``.

"Same numerics" up to rounding: the integer kernels accumulate exactly where float
kernels round, and QLinearConv adds the bias as int32 on the ``s_x * s_w`` grid, so an
activation at a rounding midpoint of the next quantizer can differ by one step from
the TensorRT form computed in float.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantlab.export.graph import GraphView, get_attr
from quantlab.runtimes.onnxruntime.forms import FORMS

ACTIVATION_ZERO_POINT = 128
_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def _activation_dq(view: GraphView, tensor: str, zero_name: str) -> Optional[onnx.NodeProto]:
    """The DQ producing ``tensor`` when it dequantizes a UINT8 activation per tensor.

    Its input is the integer tensor the integer kernels read directly (the
    output of a Q, or of the grid Relu that replaced one).
    """
    dq = view.producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear" or view.is_const(dq.input[0]):
        return None
    scale = view.const(dq.input[1])
    if scale is None or scale.size != 1:
        return None
    if (dq.input[2] if len(dq.input) > 2 else "") != zero_name:
        return None
    return dq


def _scale_of(view: GraphView, dq: onnx.NodeProto) -> float:
    return float(np.asarray(view.const(dq.input[1])).reshape(()))


def _weight_dq(view: GraphView, tensor: str) -> Optional[Tuple[onnx.NodeProto, np.ndarray, np.ndarray]]:
    """(DQ, int8 values, scale) when ``tensor`` is DQ(int8 constant) with zero point 0."""
    dq = view.producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    values, scale = view.const(dq.input[0]), view.const(dq.input[1])
    if values is None or scale is None or values.dtype != np.int8:
        return None
    if len(dq.input) > 2 and dq.input[2]:
        zero = view.const(dq.input[2])
        if zero is None or np.any(zero != 0):
            return None
    return dq, values, scale


def _to_uint8_activations(view: GraphView) -> str:
    zero_name = view.add_initializer(np.array(ACTIVATION_ZERO_POINT, dtype=np.uint8), "ort_cpu.activation_zero_point")
    for q in [n for n in view.nodes if n.op_type == "QuantizeLinear"]:
        scale = view.const(q.input[1])
        if scale is None or scale.size != 1 or view.is_const(q.input[0]):
            continue
        zero = view.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        if zero is not None and (zero.dtype != np.int8 or np.any(zero != 0)):
            continue
        _set_zero_point(q, zero_name)
        for dq in view.uses(q.output[0]):
            if dq.op_type == "DequantizeLinear":
                _set_zero_point(dq, zero_name)
    view.refresh()
    return zero_name


def _set_zero_point(node: onnx.NodeProto, name: str) -> None:
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name


def _per_channel_shape(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


# Ops that map grid values to grid values, so they commute with quantization and can
# run on the UINT8 tensor: Relu is max(q, 128) (a Clip), MaxPool is MaxPool.
_GRID_OPS = ("Relu", "MaxPool")


def _relu_to_grid(view: GraphView, conv: onnx.NodeProto, zero_name: str) -> bool:
    """Rewrites Conv [-> Relu / MaxPool ...] -> Q(s) so ONNX Runtime fuses QLinearConv (rule 2)."""
    out = conv.output[0]
    chain: List[onnx.NodeProto] = []
    tail = out
    while True:
        if view.is_graph_output(tail):
            return False
        users = view.uses(tail)
        if users and all(u.op_type == "QuantizeLinear" and u.input[0] == tail for u in users):
            break
        nxt = view.only_consumer(tail)
        if nxt is None or nxt.op_type not in _GRID_OPS or len([o for o in nxt.output if o]) != 1:
            return False
        chain.append(nxt)
        tail = nxt.output[0]
    quantizers = view.uses(tail)
    scales = {float(np.asarray(view.const(q.input[1])).reshape(-1)[0]) if view.const(q.input[1]) is not None else None for q in quantizers}
    zero_points = {q.input[2] if len(q.input) > 2 else "" for q in quantizers}
    if None in scales or len(scales) != 1 or zero_points != {zero_name}:
        return False
    if not chain:
        return True  # already DQ -> Conv -> Q
    first = quantizers[0]
    base = conv.name or out
    current = view.unique(f"{out}.quantized")
    new_nodes = [helper.make_node("QuantizeLinear", [out, first.input[1], zero_name], [current], name=view.unique(f"{base}/QuantizeLinear"))]
    for op in chain:
        result = view.unique(f"{op.output[0]}.quantized")
        if op.op_type == "Relu":
            floor = view.add_initializer(np.array(ACTIVATION_ZERO_POINT, dtype=np.uint8), f"{base}.relu_floor")
            new_nodes.append(helper.make_node("Clip", [current, floor], [result], name=view.unique(f"{op.name or result}/ClipUint8")))
        else:
            attrs = {a.name: helper.get_attribute_value(a) for a in op.attribute}
            new_nodes.append(helper.make_node(op.op_type, [current], [result], name=view.unique(f"{op.name or result}/Uint8"), **attrs))
        current = result
    for q in quantizers:
        view.replace_uses(q.output[0], current)
    view.remove(chain + quantizers)
    view.insert_after(conv, new_nodes)
    view.refresh()
    return True


def _dequantize_weight(view: GraphView, conv: onnx.NodeProto, w_dq) -> None:
    """Replaces DQ(int8 W) by a float32 initializer with DQ's exact output, ``float32(q) * s``."""
    dq, values, scale = w_dq
    axis = get_attr(dq, "axis", 1) % values.ndim
    s = np.asarray(scale, dtype=np.float32)
    if s.size > 1:
        s = _per_channel_shape(s, values.ndim, axis)
    weight = (values.astype(np.float32) * s).astype(np.float32)
    conv.input[1] = view.add_initializer(weight, f"{dq.input[0]}_dequantized")
    view.refresh()


def _float_dequantize(view: GraphView, node: onnx.NodeProto, x_dq: onnx.NodeProto) -> None:
    """qdq-float: feeds ``node`` its activation as ``(float(q) - zp) * s`` computed by Cast, Sub, Mul.

    The same float32 number DequantizeLinear gives (the Sub is exact on small integers,
    the Mul rounds once, as DQ's), but no DequantizeLinear feeds the weighted op, so
    ONNX Runtime can neither fuse it into an integer kernel (which would bring back
    the u8 x s8 kernels this form avoids) nor apply its WeightBiasQuantization pass
    (Conv/Gemm after a DQ), which re-quantizes a float weight PER TENSOR.
    """
    base = node.name or node.output[0]
    zero = view.const(x_dq.input[2])
    as_float = view.unique(f"{base}.input_as_float")
    centred = view.unique(f"{base}.input_centred")
    value = view.unique(f"{base}.input_dequantized_float")
    zero_name = view.add_initializer(np.asarray(zero, dtype=np.float32).reshape(()), f"{base}.input_zero_point_float")
    nodes = [
        helper.make_node("Cast", [x_dq.input[0]], [as_float], to=TensorProto.FLOAT, name=view.unique(f"{base}/DequantizeCast")),
        helper.make_node("Sub", [as_float, zero_name], [centred], name=view.unique(f"{base}/DequantizeSub")),
        helper.make_node("Mul", [centred, x_dq.input[1]], [value], name=view.unique(f"{base}/DequantizeMul")),
    ]
    node.input[0] = value
    view.insert_after(x_dq, nodes)
    view.refresh()


_INT64_MAX = np.iinfo(np.int64).max
CONTRIB_DOMAIN = "com.microsoft"


def _integer_gemm(view, add, a: str, b: str, b_zero: str, a_scale: float, b_scale: np.ndarray, zero_name: str,
                  bias: Optional[np.ndarray], base: str) -> str:
    """``(a - 128) @ (b - b_zero) * a_scale * b_scale [+ bias]`` as ONNX Runtime's MatMulIntegerToFloat.

    One contrib kernel (MLAS integer GEMM with a float epilogue) instead of
    MatMulInteger -> Cast -> Mul -> Add, which ONNX Runtime does not fuse for
    constant scales: same arithmetic (float(acc) * scale + bias), fewer passes.
    """
    a_scale_name = view.add_initializer(np.array(a_scale, dtype=np.float32), f"{base}.a_scale")
    b_scale_name = view.add_initializer(b_scale if b_scale.size > 1 else b_scale.reshape(()), f"{base}.b_scale")
    inputs = [a, b, a_scale_name, b_scale_name, zero_name, b_zero]
    if bias is not None:
        inputs.append(view.add_initializer(bias, f"{base}.bias"))
    _require_contrib_domain(view)
    return add("MatMulIntegerToFloat", inputs, "gemm", domain=CONTRIB_DOMAIN)


def _require_contrib_domain(view: GraphView) -> None:
    if not any(entry.domain == CONTRIB_DOMAIN for entry in view.model.opset_import):
        view.model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))


def _conv_im2col(view: GraphView, conv: onnx.NodeProto, x_dq: onnx.NodeProto, w_dq, zero_name: str) -> bool:
    """Rule 3, "im2col": a 2-D Conv as an integer GEMM over unfolded UINT8 patches (NHWC)."""
    _, w_values, w_scale = w_dq
    if w_values.ndim != 4 or int(get_attr(conv, "group", 1)) != 1:
        return False
    auto_pad = get_attr(conv, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        return False
    out_channels, in_channels, kh, kw = w_values.shape
    sh, sw = list(get_attr(conv, "strides", [1, 1]))
    dh, dw = list(get_attr(conv, "dilations", [1, 1]))
    top, left, bottom, right = list(get_attr(conv, "pads", [0, 0, 0, 0]))
    base = conv.name or conv.output[0]
    x_scale = _scale_of(view, x_dq)
    nodes: List[onnx.NodeProto] = []

    def add(op: str, inputs: List[str], hint: str, **attrs) -> str:
        out = view.unique(f"{base}.{hint}")
        domain = attrs.pop("domain", "")
        nodes.append(helper.make_node(op, inputs, [out], name=view.unique(f"{base}/{op}"), domain=domain, **attrs))
        return out

    nhwc = add("Transpose", [x_dq.input[0]], "nhwc", perm=[0, 2, 3, 1])
    if any((top, left, bottom, right)):
        pads = view.add_initializer(np.array([0, top, left, 0, 0, bottom, right, 0], dtype=np.int64), f"{base}.pads")
        nhwc = add("Pad", [nhwc, pads, zero_name], "padded")  # pad with the zero point: the value 0.0
    columns = []
    for i in range(kh):
        for j in range(kw):
            tail_h, tail_w = dh * (kh - 1 - i), dw * (kw - 1 - j)
            starts = view.add_initializer(np.array([dh * i, dw * j], dtype=np.int64), f"{base}.starts")
            ends = view.add_initializer(np.array([-tail_h if tail_h else _INT64_MAX, -tail_w if tail_w else _INT64_MAX], dtype=np.int64), f"{base}.ends")
            axes = view.add_initializer(np.array([1, 2], dtype=np.int64), f"{base}.axes")
            steps = view.add_initializer(np.array([sh, sw], dtype=np.int64), f"{base}.steps")
            columns.append(add("Slice", [nhwc, starts, ends, axes, steps], f"tap{i}_{j}"))
    patches = add("Concat", columns, "patches", axis=3) if len(columns) > 1 else columns[0]
    # patch index (i * kw + j) * C + c  <->  weight [O, C, kh, kw] as [kh, kw, C, O]
    weight = np.ascontiguousarray(w_values.transpose(2, 3, 1, 0).reshape(kh * kw * in_channels, out_channels))
    w_name = view.add_initializer(weight, f"{base}.weight_int8_im2col")
    w_zero = view.add_initializer(np.array(0, dtype=np.int8), f"{base}.weight_zero_point")
    bias = view.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    scaled = _integer_gemm(view, add, patches, w_name, w_zero, x_scale, np.asarray(w_scale, dtype=np.float32).reshape(-1),
                           zero_name, None if bias is None else bias.astype(np.float32), base)
    nodes.append(helper.make_node("Transpose", [scaled], [conv.output[0]], name=view.unique(f"{base}/ToNCHW"), perm=[0, 3, 1, 2]))
    view.insert_after(conv, nodes)
    view.remove([conv])
    view.refresh()
    return True


def _conv_integer(view: GraphView, conv: onnx.NodeProto, x_dq: onnx.NodeProto, w_dq, zero_name: str) -> None:
    """Rule 3: ConvInteger -> Cast -> Mul -> Add, writing the conv's original output."""
    _, w_values, w_scale = w_dq
    x_scale = _scale_of(view, x_dq)
    rank = w_values.ndim
    scale = (np.asarray(w_scale, dtype=np.float64).reshape(-1) * x_scale).astype(np.float32)
    scale = _per_channel_shape(scale, rank, 1) if scale.size > 1 else scale.reshape(())
    base = conv.name or conv.output[0]
    w_name = view.add_initializer(w_values, f"{base}.weight_int8")
    w_zero = view.add_initializer(np.array(0, dtype=np.int8), f"{base}.weight_zero_point")
    acc = view.unique(f"{base}.int32")
    acc_float = view.unique(f"{base}.int32_as_float")
    scaled = view.unique(f"{base}.scaled")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute if a.name in _CONV_ATTRS}
    nodes = [
        helper.make_node("ConvInteger", [x_dq.input[0], w_name, zero_name, w_zero], [acc], name=view.unique(f"{base}/ConvInteger"), **attrs),
        helper.make_node("Cast", [acc], [acc_float], to=TensorProto.FLOAT, name=view.unique(f"{base}/Cast")),
    ]
    bias = view.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    scale_name = view.add_initializer(scale, f"{base}.output_scale")
    if bias is None:
        nodes.append(helper.make_node("Mul", [acc_float, scale_name], [conv.output[0]], name=view.unique(f"{base}/Mul")))
    else:
        bias_name = view.add_initializer(_per_channel_shape(bias.astype(np.float32), rank, 1), f"{base}.bias_nchw")
        nodes.append(helper.make_node("Mul", [acc_float, scale_name], [scaled], name=view.unique(f"{base}/Mul")))
        nodes.append(helper.make_node("Add", [scaled, bias_name], [conv.output[0]], name=view.unique(f"{base}/AddBias")))
    view.insert_after(conv, nodes)
    view.remove([conv])
    view.refresh()


def _matmul_integer(view: GraphView, node: onnx.NodeProto, zero_name: str) -> bool:
    """Rule 4 for Gemm and MatMul with a quantized activation and an INT8 constant (or quantized) B."""
    a_dq = _activation_dq(view, node.input[0], zero_name)
    if a_dq is None:
        return False
    a_scale = _scale_of(view, a_dq)
    base = node.name or node.output[0]
    b_dq = _activation_dq(view, node.input[1], zero_name)
    w_dq = _weight_dq(view, node.input[1])
    alpha, beta, bias = 1.0, 1.0, None
    if node.op_type == "Gemm":
        if get_attr(node, "transA", 0) or w_dq is None:
            return False
        alpha, beta = float(get_attr(node, "alpha", 1.0)), float(get_attr(node, "beta", 1.0))
        if len(node.input) > 2 and node.input[2]:
            bias = view.const(node.input[2])
            if bias is None:
                return False
    if w_dq is not None:
        _, w_values, w_scale = w_dq
        if w_values.ndim != 2:
            return False
        trans_b = node.op_type == "Gemm" and bool(get_attr(node, "transB", 0))
        weight = np.ascontiguousarray(w_values.T) if trans_b else w_values
        w_scale = np.asarray(w_scale, dtype=np.float64).reshape(-1)
        if w_scale.size > 1:
            axis = get_attr(w_dq[0], "axis", 1) % 2
            if axis != (0 if trans_b else 1):
                return False  # per-channel along K cannot be applied after the integer product
        b_input = view.add_initializer(weight, f"{base}.weight_int8")
        b_zero = view.add_initializer(np.array(0, dtype=np.int8), f"{base}.weight_zero_point")
        b_scale = (w_scale * alpha).astype(np.float32)
    elif b_dq is not None and node.op_type == "MatMul":
        b_input, b_zero = b_dq.input[0], zero_name
        b_scale = np.array([_scale_of(view, b_dq)], dtype=np.float32)
    else:
        return False
    nodes: List[onnx.NodeProto] = []

    def add(op: str, inputs: List[str], hint: str, **attrs) -> str:
        domain = attrs.pop("domain", "")
        nodes.append(helper.make_node(op, inputs, [node.output[0]], name=view.unique(f"{base}/{op}"), domain=domain, **attrs))
        return node.output[0]

    scaled_bias = None if bias is None else (bias.astype(np.float64) * beta).astype(np.float32)
    _integer_gemm(view, add, a_dq.input[0], b_input, b_zero, a_scale, b_scale, zero_name, scaled_bias, base)
    view.insert_after(node, nodes)
    view.remove([node])
    view.refresh()
    return True


def _reduce_weight_range(view: GraphView) -> int:
    """7-bit weights: ``q7 = rint(q * 63 / 127)`` in [-63, 63], scale ``s * 127 / 63`` (the same amax).

    A u8 x s8 pair then sums to at most 255 * 64 * 2 < 32768, so even a 16-bit
    saturating kernel is exact; the values differ from the 8-bit ones TensorRT uses.
    """
    done = set()
    for node in list(view.nodes):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w_dq = _weight_dq(view, node.input[1])
        if w_dq is None or id(w_dq[0]) in done:
            continue
        dq, values, scale = w_dq
        done.add(id(dq))
        reduced = np.clip(np.rint(values.astype(np.float64) * 63.0 / 127.0), -63, 63).astype(np.int8)
        wider = (np.asarray(scale, dtype=np.float64) * (127.0 / 63.0)).astype(np.float32)
        dq.input[0] = view.add_initializer(reduced, f"{dq.input[0]}_7bit")
        dq.input[1] = view.add_initializer(wider.reshape(np.shape(scale)), f"{dq.input[1]}_7bit")
    view.refresh()
    return len(done)


def _to_uint8_weight(view: GraphView, node: onnx.NodeProto, value_index: int, zero_index: int) -> bool:
    """u8u8: input ``value_index`` (INT8, zero point 0) becomes UINT8 ``q + 128`` with zero point 128."""
    values = view.const(node.input[value_index])
    zero = view.const(node.input[zero_index]) if len(node.input) > zero_index and node.input[zero_index] else None
    if values is None or values.dtype != np.int8 or (zero is not None and (zero.dtype != np.int8 or np.any(zero != 0))):
        return False
    base = node.input[value_index]
    node.input[value_index] = view.add_initializer((values.astype(np.int16) + 128).astype(np.uint8), f"{base}_uint8")
    if zero is not None:
        zero_shape = np.shape(zero)
    elif node.op_type == "DequantizeLinear":  # DQ's zero point has its scale's shape
        zero_shape = np.shape(view.const(node.input[1]))
    else:
        zero_shape = ()
    while len(node.input) <= zero_index:
        node.input.append("")
    node.input[zero_index] = view.add_initializer(np.full(zero_shape, 128, dtype=np.uint8), f"{base}_zero_point_uint8")
    return True


def _weights_to_uint8(view: GraphView, zero_name: str) -> int:
    """u8u8: every INT8 weight an integer kernel reads becomes UINT8 with zero point 128.

    Integer kernels: MatMulIntegerToFloat (B), ConvInteger (W) and the weight DQ of
    each ``DQ -> Conv -> Q`` that ONNX Runtime fuses into QLinearConv.
    """
    converted = 0
    for node in list(view.nodes):
        if node.op_type == "MatMulIntegerToFloat":
            converted += _to_uint8_weight(view, node, 1, 5)
        elif node.op_type == "ConvInteger":
            converted += _to_uint8_weight(view, node, 1, 3)
        elif node.op_type == "Conv" and _activation_dq(view, node.input[0], zero_name) is not None:
            w_dq = _weight_dq(view, node.input[1])
            if w_dq is not None:
                converted += _to_uint8_weight(view, w_dq[0], 0, 2)
    view.refresh()
    return converted


OTHER_CONVS = ("im2col", "float", "conv-integer")


def convert_to_ort_cpu(view: GraphView, *, other_convs: str = "im2col", form: str = "u8s8", weight_bits: int = 8) -> dict:
    """Rewrites a TensorRT-form Q/DQ graph (in place) into the ort-cpu form.

    Args:
        view: The graph.
        other_convs: How Convs that cannot become QLinearConv run (rule 3):
            ``"im2col"``, ``"float"`` or ``"conv-integer"``.
        form: The integer form: ``"u8s8"``, ``"u8u8"`` or ``"qdq-float"`` (see the module doc).
        weight_bits: 8, or 7 for reduce_range weights.

    Returns:
        Counts: ``qlinear_conv``, ``im2col_conv``, ``conv_integer``, ``float_conv``,
        ``matmul_integer``, ``float_matmul``, ``uint8_weights``, ``reduced_weights``.
    """
    if other_convs not in OTHER_CONVS:
        raise ValueError(f"other_convs must be one of {', '.join(OTHER_CONVS)}, got {other_convs!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {weight_bits!r}")
    counts = {"qlinear_conv": 0, "im2col_conv": 0, "conv_integer": 0, "float_conv": 0, "matmul_integer": 0,
              "float_matmul": 0, "uint8_weights": 0, "reduced_weights": 0}
    if weight_bits == 7:
        counts["reduced_weights"] = _reduce_weight_range(view)
    zero_name = _to_uint8_activations(view)
    for node in list(view.nodes):
        if form == "qdq-float" and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            w_dq = _weight_dq(view, node.input[1]) if len(node.input) > 1 else None
            x_dq = _activation_dq(view, node.input[0], zero_name)
            if w_dq is not None and x_dq is not None:
                _float_dequantize(view, node, x_dq)
                _dequantize_weight(view, node, w_dq)
                counts["float_conv" if node.op_type.startswith("Conv") else "float_matmul"] += 1
            continue
        if node.op_type == "Conv":
            x_dq = _activation_dq(view, node.input[0], zero_name)
            w_dq = _weight_dq(view, node.input[1])
            if x_dq is None or w_dq is None:
                continue
            if len(node.input) > 2 and node.input[2] and view.const(node.input[2]) is None:
                continue
            if _relu_to_grid(view, node, zero_name):
                counts["qlinear_conv"] += 1
            elif other_convs == "im2col" and _conv_im2col(view, node, x_dq, w_dq, zero_name):
                counts["im2col_conv"] += 1
            elif other_convs == "conv-integer":
                _conv_integer(view, node, x_dq, w_dq, zero_name)
                counts["conv_integer"] += 1
            else:
                _dequantize_weight(view, node, w_dq)
                counts["float_conv"] += 1
        elif node.op_type in ("Gemm", "MatMul"):
            counts["matmul_integer"] += int(_matmul_integer(view, node, zero_name))
    if form == "u8u8":
        counts["uint8_weights"] = _weights_to_uint8(view, zero_name)
    view.prune()
    return counts


__all__ = ["ACTIVATION_ZERO_POINT", "FORMS", "OTHER_CONVS", "convert_to_ort_cpu"]
