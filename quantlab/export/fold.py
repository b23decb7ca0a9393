"""Folding passes on exported graphs: constants, weight quantizers, BatchNorm.

TensorRT needs Q/DQ scales and zero points that are build-time constants, and
both TensorRT and ONNX Runtime fuse best when a weight reaches its Conv/Gemm as
``DequantizeLinear(int8 initializer)``. These passes bring an exporter's graph
into that form without changing its numerics.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper

from quantlab.export.graph import GraphView, get_attr

# Never evaluated at export time: Q/DQ must stay visible to TensorRT and ONNX Runtime.
_NO_FOLD = {"QuantizeLinear", "DequantizeLinear", "Constant", "RandomNormal", "RandomUniform",
            "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "If", "Loop", "Scan"}


def fold_constants(view: GraphView, *, max_elements: int = 1 << 26) -> int:
    """Evaluates every node whose inputs are all constants; returns how many were folded.

    Uses ``onnx.reference`` so any standard operator is covered. Q/DQ nodes are
    never folded (TensorRT reads the quantization from them).
    """
    from onnx.reference import ReferenceEvaluator

    view.constants_to_initializers()
    opsets = list(view.model.opset_import)
    folded = 0
    changed = True
    while changed:
        changed = False
        for node in list(view.nodes):
            if node.op_type in _NO_FOLD or node.domain not in ("", "ai.onnx"):
                continue
            inputs = [i for i in node.input if i]
            if not inputs or any(view.is_graph_output(o) for o in node.output):
                continue
            values = [view.const(i) for i in inputs]
            if any(v is None for v in values) or sum(int(v.size) for v in values) > max_elements:
                continue
            feeds = {name: value for name, value in zip(inputs, values)}
            graph = helper.make_graph(
                [node], "fold",
                [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
                [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
            )
            try:
                outputs = ReferenceEvaluator(helper.make_model(graph, opset_imports=opsets)).run(None, feeds)
            except Exception:  # noqa: BLE001 - an op the reference cannot run stays in the graph
                continue
            for name, value in zip([o for o in node.output if o], outputs):
                view.set_initializer(name, np.asarray(value))
            view.remove([node])
            view.refresh()
            folded += 1
            changed = True
    return folded


def quantize_weight(weight: np.ndarray, scale: np.ndarray, axis: Optional[int], qmin: int = -127, qmax: int = 127) -> np.ndarray:
    """INT8 values of a weight exactly as PyTorch's fake quantization computes them.

    ``clamp(round_half_even(w * (1 / scale)), qmin, qmax)`` in float32, the
    formula of ``torch.fake_quantize_per_*_affine``; the narrow range [-127, 127]
    is applied here, which is why the export may run the exporter with
    (-128, 127): the weight values that reach the file are identical.
    """
    w = np.asarray(weight, dtype=np.float32)
    s = np.asarray(scale, dtype=np.float32)
    if s.ndim == 1 and axis is not None:
        shape = [1] * w.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    inv = (np.float32(1.0) / s).astype(np.float32)
    return np.clip(np.rint(w * inv), qmin, qmax).astype(np.int8)


def fold_weight_quantizers(view: GraphView) -> Dict[str, str]:
    """Replaces ``Q(W) [-> Clip] -> DQ`` on constant weights by ``DQ(int8 initializer)``.

    Also moves a Transpose that follows the weight DQ into the initializer (the
    per-channel axis follows it), so the weighted op reads the DQ directly.

    Returns:
        ``{original float weight initializer name: new int8 initializer name}``.
    """
    renamed: Dict[str, str] = {}
    for dq in [n for n in view.nodes if n.op_type == "DequantizeLinear"]:
        chain = _weight_chain(view, dq)
        if chain is None:
            continue
        q, clip, w_name = chain
        weight = view.const(w_name)
        scale = view.const(q.input[1])
        axis = get_attr(q, "axis", 1) if scale.ndim == 1 and scale.size > 1 else None
        if axis is not None:
            axis %= weight.ndim
        qmin, qmax = -127, 127
        if clip is not None:  # the dynamo exporter spells the narrow range as Clip
            lo, hi = view.const(clip.input[1]), view.const(clip.input[2]) if len(clip.input) > 2 else None
            qmin = max(qmin, int(lo)) if lo is not None else qmin
            qmax = min(qmax, int(hi)) if hi is not None else qmax
        q_values = quantize_weight(weight, scale, axis, qmin, qmax)
        int_name = view.unique(_clean_weight_name(w_name))
        view.set_initializer(int_name, q_values)
        dq.input[0] = int_name
        dq.input[1] = view.add_initializer(view.const(dq.input[1]).astype(np.float32), int_name + "_scale")
        zero = np.zeros(scale.shape, dtype=np.int8)
        if len(dq.input) > 2:
            dq.input[2] = view.add_initializer(zero, int_name + "_zero_point")
        else:
            dq.input.append(view.add_initializer(zero, int_name + "_zero_point"))
        renamed[w_name] = int_name
        view.remove([n for n in (q, clip) if n is not None])
        view.refresh()
        _absorb_transpose(view, dq)
    view.prune()
    return renamed


def _weight_chain(view: GraphView, dq: onnx.NodeProto):
    src = view.producer.get(dq.input[0])
    clip = None
    if src is not None and src.op_type == "Clip":
        clip, src = src, view.producer.get(src.input[0])
    if src is None or src.op_type != "QuantizeLinear":
        return None
    if view.const(src.input[0]) is None or view.const(src.input[1]) is None:
        return None
    if len(view.uses(src.output[0])) != 1 or (clip is not None and len(view.uses(clip.output[0])) != 1):
        return None
    zero_point = view.const(src.input[2]) if len(src.input) > 2 and src.input[2] else None
    if zero_point is not None and (zero_point.dtype != np.int8 or np.any(zero_point != 0)):
        return None
    return src, clip, src.input[0]


def _clean_weight_name(name: str) -> str:
    for suffix in (".parametrizations.weight.original",):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return name + "_quantized"


def _absorb_transpose(view: GraphView, dq: onnx.NodeProto) -> None:
    user = view.only_consumer(dq.output[0])
    if user is None or user.op_type != "Transpose":
        return
    q_values = view.const(dq.input[0])
    perm = get_attr(user, "perm") or list(reversed(range(q_values.ndim)))
    view.set_initializer(dq.input[0], np.ascontiguousarray(np.transpose(q_values, perm)))
    scale = view.const(dq.input[1])
    if scale.ndim == 1 and scale.size > 1:
        old_axis = get_attr(dq, "axis", 1) % q_values.ndim
        _set_axis(dq, list(perm).index(old_axis))
    view.replace_uses(user.output[0], dq.output[0])
    if user.output[0] in view.graph_outputs:
        return
    view.remove([user])
    view.refresh()


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == "axis":
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute("axis", int(axis)))


def _bias_name(view: GraphView, conv: onnx.NodeProto) -> str:
    """``<module>.bias`` when the weight is named ``<module>.weight``, else derived from the node."""
    weight = conv.input[1]
    dq = view.producer.get(weight)
    if dq is not None and dq.op_type == "DequantizeLinear":
        weight = dq.input[0]
    for suffix in (".weight", ".weight.bn_folded"):
        if weight.endswith(suffix):
            return weight[: -len(suffix)] + ".bias"
    return (conv.name or conv.output[0]) + ".bias"


def _replace_const(view: GraphView, name: str, value: np.ndarray) -> str:
    """Overwrites constant ``name`` when only one node reads it, else adds a fresh one."""
    if len(view.uses(name)) == 1:
        return view.set_initializer(name, value)
    return view.add_initializer(value, name)


def fold_batchnorm(view: GraphView) -> List[str]:
    """Folds inference BatchNormalization into the Conv/ConvTranspose in front of it.

    With a float weight, ``W' = W * a`` and ``b' = (b - mean) * a + beta`` where
    ``a = gamma / sqrt(var + eps)``. With a quantized weight ``DQ(q, s)`` the fold
    is exact on the INT8 grid: the per-channel scale becomes ``s * |a|`` and the
    integer values change sign where ``a < 0`` (the narrow range [-127, 127] is
    symmetric), so the dequantized weight is ``q * s * a`` as before. TensorRT
    performs this fusion itself; doing it here also lets ONNX Runtime fuse the
    Conv with its output quantizer.

    Returns:
        Names of the BatchNormalization nodes folded.
    """
    folded: List[str] = []
    for bn in [n for n in view.nodes if n.op_type == "BatchNormalization"]:
        if len([o for o in bn.output if o]) != 1 or get_attr(bn, "training_mode", 0):
            continue
        conv = view.producer.get(bn.input[0])
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or view.only_consumer(conv.output[0]) is not bn:
            continue
        params = [view.const(i) for i in bn.input[1:5]]
        if any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = float(get_attr(bn, "epsilon", 1e-5))
        a = gamma / np.sqrt(var + eps)
        shift = beta - mean * a
        if conv.op_type == "ConvTranspose" and int(get_attr(conv, "group", 1)) != 1:
            continue
        out_axis = 1 if conv.op_type == "ConvTranspose" else 0
        if not _fold_into_weight(view, conv, a, out_axis):
            continue
        bias = view.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros_like(a)
        if bias is None:
            continue
        new_bias = (bias.astype(np.float64) * a + shift).astype(np.float32)
        bias_name = view.add_initializer(new_bias, _bias_name(view, conv))
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = bias_name
        conv.output[0] = bn.output[0]
        view.remove([bn])
        view.refresh()
        folded.append(bn.name or bn.output[0])
    if folded:
        view.prune()
    return folded


def _fold_into_weight(view: GraphView, conv: onnx.NodeProto, a: np.ndarray, out_axis: int) -> bool:
    w_name = conv.input[1]
    weight = view.const(w_name)
    if weight is not None:  # float weight
        if len(view.uses(w_name)) != 1 or weight.shape[out_axis] != a.size:
            return False
        shape = [1] * weight.ndim
        shape[out_axis] = -1
        new = (weight.astype(np.float64) * a.reshape(shape)).astype(weight.dtype)
        conv.input[1] = _replace_const(view, w_name, new)
        return True
    dq = view.producer.get(w_name)
    if dq is None or dq.op_type != "DequantizeLinear" or view.only_consumer(dq.output[0]) is not conv:
        return False
    q, scale = view.const(dq.input[0]), view.const(dq.input[1])
    if q is None or scale is None or q.dtype != np.int8 or q.shape[out_axis] != a.size:
        return False
    per_channel = scale.ndim == 1 and scale.size > 1
    if per_channel and get_attr(dq, "axis", 1) % q.ndim != out_axis:
        return False
    if np.any(a == 0) or (np.any(a < 0) and np.any(q == -128)):
        return False
    shape = [1] * q.ndim
    shape[out_axis] = -1
    sign = np.where(a < 0, -1, 1).astype(np.int16)
    new_q = (q.astype(np.int16) * sign.reshape(shape)).astype(np.int8)
    base = scale.astype(np.float64).reshape(-1) if per_channel else np.full(a.size, float(scale.reshape(())))
    new_scale = (base * np.abs(a)).astype(np.float32)
    dq.input[0] = _replace_const(view, dq.input[0], new_q)
    dq.input[1] = _replace_const(view, dq.input[1], new_scale)
    zero = np.zeros(a.size, dtype=np.int8)
    if len(dq.input) > 2 and dq.input[2]:
        dq.input[2] = _replace_const(view, dq.input[2], zero)
    else:
        dq.input.append(view.add_initializer(zero, dq.input[0] + "_zero_point"))
    _set_axis(dq, out_axis)
    return True


__all__ = ["fold_batchnorm", "fold_constants", "fold_weight_quantizers", "quantize_weight"]
