"""Q/DQ placement pass: move quantization to where TensorRT fuses it.

quantlab attaches quantizers to the INPUTS of weighted layers only (and never
to their outputs), which already matches TensorRT's main rule: quantize all
inputs of Conv/ConvTranspose/Gemm/MatMul so they run INT8, and leave their
outputs in floating point so Conv+BN+ReLU(+Add) fuse into one kernel whose
output is quantized by the NEXT layer's Q. The graph pass below fixes the
patterns attachment alone cannot see, because they are functional ops
(``out + x``, ``torch.cat``, ``F.pad``) and not modules:

* **Residual Add**: ``Add(conv_branch, skip)`` with a float ``skip`` forces
  TensorRT to run the Add (and often a reformat) in FP16/FP32, which is how
  INT8 ends up slower than FP16. If ``skip`` is already quantized for another
  consumer (in a ResNet block the block input also feeds ``conv1``'s
  quantizer), the Add is pointed at that DequantizeLinear, so TensorRT fuses
  the Add into the conv's epilogue with an INT8 residual. The scale is the one
  calibrated on that very tensor. Skips without a calibrated scale are
  reported (``quantlab check`` warns about them).
* **Concat**: inputs quantized with different scales make TensorRT insert
  re-quantization; all inputs get one shared scale, the largest (max of the
  inputs' amax), so no input is clipped more than it was.
* **DQ -> Reshape/Flatten/Transpose -> Gemm/MatMul**: a per-tensor DQ commutes
  with ops that only move data, so it is moved after them and the weighted op
  reads the DQ directly (the pattern both TensorRT and ONNX Runtime fuse; HF
  Conv1D and Linear on 3-D inputs export this way).
* **Pad -> Q/DQ -> Conv**: TensorRT fuses Pad into Conv only when nothing sits
  between them; the Q/DQ is moved in front of the Pad. Padding with 0 (or
  reflect/edge padding) commutes with quantization, so numerics are unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np
import onnx
from onnx import helper

from quantlab.export.graph import WEIGHTED_OPS, GraphView, get_attr, node_label

_ELEMENTWISE_AFTER_WEIGHTED = ("BatchNormalization",)


@dataclasses.dataclass
class PlacementReport:
    """What the placement pass changed and what it had to leave.

    Attributes:
        residual_quantized: Add nodes whose skip input now reads a shared DQ.
        residual_left_float: Add nodes whose skip has no calibrated scale (``node: tensor``).
        concat_unified: Concat nodes whose input scales were unified.
        pad_moved: Pad nodes the Q/DQ was moved in front of.
        dq_sunk: Shape-only nodes a DequantizeLinear was moved behind.
    """

    residual_quantized: List[str] = dataclasses.field(default_factory=list)
    residual_left_float: List[str] = dataclasses.field(default_factory=list)
    concat_unified: List[str] = dataclasses.field(default_factory=list)
    pad_moved: List[str] = dataclasses.field(default_factory=list)
    dq_sunk: List[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_weighted_op(view: GraphView, tensor: str) -> bool:
    """Whether ``tensor`` is the output of a weighted op (optionally through BatchNormalization)."""
    node = view.producer.get(tensor)
    while node is not None and node.op_type in _ELEMENTWISE_AFTER_WEIGHTED:
        node = view.producer.get(node.input[0])
    return node is not None and node.op_type in WEIGHTED_OPS


def _is_dq_output(view: GraphView, tensor: str) -> bool:
    node = view.producer.get(tensor)
    return node is not None and node.op_type == "DequantizeLinear"


def _existing_dq_of(view: GraphView, tensor: str) -> Optional[str]:
    """Output of a per-tensor DQ(Q(tensor)) pair already in the graph, if any."""
    for q in view.uses(tensor):
        if q.op_type != "QuantizeLinear" or q.input[0] != tensor:
            continue
        scale = view.const(q.input[1])
        if scale is None or scale.size != 1:
            continue
        for dq in view.uses(q.output[0]):
            if dq.op_type == "DequantizeLinear":
                return dq.output[0]
    return None


def quantize_residuals(view: GraphView, report: PlacementReport) -> None:
    for add in [n for n in view.nodes if n.op_type == "Add"]:
        if len(add.input) != 2 or any(view.is_const(i) for i in add.input):
            continue
        a, b = add.input
        branch = [from_weighted_op(view, a), from_weighted_op(view, b)]
        if branch == [True, False]:
            skip_index = 1
        elif branch == [False, True]:
            skip_index = 0
        else:
            continue
        skip = add.input[skip_index]
        if _is_dq_output(view, skip):
            continue
        shared = _existing_dq_of(view, skip)
        if shared is None:
            report.residual_left_float.append(f"{node_label(add)}: {skip}")
            continue
        add.input[skip_index] = shared
        report.residual_quantized.append(node_label(add))
    view.refresh()


def unify_concat_scales(view: GraphView, report: PlacementReport) -> None:
    for concat in [n for n in view.nodes if n.op_type == "Concat"]:
        pairs = []
        for tensor in concat.input:
            dq = view.producer.get(tensor)
            q = view.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                pairs = []
                break
            scale = view.const(q.input[1])
            if scale is None or scale.size != 1 or view.const(dq.input[1]) is None:
                pairs = []
                break
            pairs.append((q, dq, float(scale.reshape(()))))
        if len(pairs) < 2 or len({s for _, _, s in pairs}) == 1:
            continue
        shared = max(s for _, _, s in pairs)
        scale_name = view.add_initializer(np.array(shared, dtype=np.float32), f"{concat.name or concat.output[0]}.shared_scale")
        for index, (q, dq, _) in enumerate(pairs):
            if len(view.uses(dq.output[0])) == 1 and len(view.uses(q.output[0])) == 1:
                q.input[1] = scale_name
                dq.input[1] = scale_name
                continue
            # The DQ also feeds other layers: give the Concat its own pair, leave theirs alone.
            q_out = view.unique(f"{q.input[0]}.concat_q")
            dq_out = view.unique(f"{q.input[0]}.concat_dq")
            zero_point = list(q.input[2:3])
            new_q = helper.make_node("QuantizeLinear", [q.input[0], scale_name] + zero_point, [q_out], name=view.unique(f"{concat.name}.q{index}"))
            new_dq = helper.make_node("DequantizeLinear", [q_out, scale_name] + zero_point, [dq_out], name=view.unique(f"{concat.name}.dq{index}"))
            view.insert_after(dq, [new_q, new_dq])
            concat.input[index] = dq_out
        view.refresh()
        report.concat_unified.append(node_label(concat))


def _pad_commutes_with_quantization(view: GraphView, pad: onnx.NodeProto) -> bool:
    mode = get_attr(pad, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode != "constant":
        return True  # reflect/edge/wrap copy values that are already on the grid
    value = None
    if len(pad.input) > 2 and pad.input[2]:
        value = view.const(pad.input[2])
        if value is None:
            return False
    else:
        value = get_attr(pad, "value", 0.0)
    return float(np.asarray(value).reshape(-1)[0] if np.asarray(value).size else 0.0) == 0.0


def move_qdq_above_pad(view: GraphView, report: PlacementReport) -> None:
    for q in [n for n in view.nodes if n.op_type == "QuantizeLinear"]:
        pad = view.producer.get(q.input[0])
        if pad is None or pad.op_type != "Pad" or view.only_consumer(pad.output[0]) is not q:
            continue
        dqs = view.uses(q.output[0])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        if not all(all(c.op_type == "Conv" for c in view.uses(d.output[0])) for d in dqs):
            continue
        if not _pad_commutes_with_quantization(view, pad):
            continue
        source = pad.input[0]
        pad_out = pad.output[0]
        dq = dqs[0]
        # x -> Q -> DQ -> Pad -> Conv: reuse the Q/DQ nodes, re-wire their tensors.
        q.input[0] = source
        pad.input[0] = dq.output[0]
        pad.output[0] = view.unique(f"{pad_out}.padded")
        for other in dqs:
            view.replace_uses(other.output[0], pad.output[0], only=[c for c in view.uses(other.output[0]) if c is not pad])
        view.refresh()
        report.pad_moved.append(node_label(pad))


_SHAPE_ONLY = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")


def sink_dq_through_shape_ops(view: GraphView, report: PlacementReport) -> None:
    for dq in [n for n in view.nodes if n.op_type == "DequantizeLinear"]:
        scale = view.const(dq.input[1])
        if scale is None or scale.size != 1 or view.is_const(dq.input[0]):
            continue
        if view.is_graph_output(dq.output[0]):
            continue
        users = view.uses(dq.output[0])
        readers_of_shape = [u for u in users if u.op_type == "Shape"]  # read only the shape: int8 has the same
        movers = [u for u in users if u.op_type in _SHAPE_ONLY and u.input[0] == dq.output[0]]
        if len(movers) != 1 or len(movers) + len(readers_of_shape) != len(users):
            continue
        shape_op = movers[0]
        users = view.uses(shape_op.output[0])
        if not users or view.is_graph_output(shape_op.output[0]) or not all(u.op_type in WEIGHTED_OPS for u in users):
            continue
        # int8 -> shape op -> DQ: same values, the weighted op now reads the DQ.
        integer_in, float_out = dq.input[0], shape_op.output[0]
        for reader in readers_of_shape:
            reader.input[0] = integer_in
        moved = view.unique(f"{float_out}.quantized")
        shape_op.input[0] = integer_in
        shape_op.output[0] = moved
        dq.input[0] = moved
        dq.output[0] = float_out
        view.refresh()
        report.dq_sunk.append(node_label(shape_op))


def apply_placement(view: GraphView) -> PlacementReport:
    """Runs every placement rule on a Q/DQ graph (in place) and reports what changed."""
    report = PlacementReport()
    sink_dq_through_shape_ops(view, report)
    move_qdq_above_pad(view, report)
    quantize_residuals(view, report)
    unify_concat_scales(view, report)
    view.prune()
    return report


__all__ = [
    "PlacementReport",
    "apply_placement",
    "from_weighted_op",
    "move_qdq_above_pad",
    "quantize_residuals",
    "sink_dq_through_shape_ops",
    "unify_concat_scales",
]
