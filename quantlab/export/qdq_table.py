"""Where the Q/DQ nodes of an ONNX model sit: one row per QuantizeLinear / DequantizeLinear.

A table instead of a graph viewer: for each Q/DQ node, the tensor it quantizes
(an activation or a weight initializer), the layer (quantlab's tensor map, when
the file has one), the nodes that read its output, and its scale and zero point
(per tensor, or per channel along ``axis``). ``quantlab check --table`` prints it;
the dashboard's Export page shows it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import onnx
from onnx import numpy_helper

from quantlab.export.errors import OnnxFormatError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclasses.dataclass
class QdqRow:
    """One Q or DQ node.

    Attributes:
        node: The node's name (``""`` if unnamed).
        op: ``"Q"`` (QuantizeLinear) or ``"DQ"`` (DequantizeLinear).
        tensor: The node's data input: the float tensor a Q quantizes, or the
            integer tensor (often a weight initializer) a DQ dequantizes.
        quantized: ``"weight"`` (the data comes from an initializer/Constant, or
            its Q does) or ``"activation"``.
        layer: quantlab's quantizer key (``"conv1:input"``, ``"fc:weight"``) of the
            tensor, from the file's tensor map; ``""`` when unknown (another tool's
            file, or a Q/DQ the placement pass added, e.g. on a residual Add).
        consumers: ``"Conv /conv1/Conv (input 0)"`` for each node reading the output.
        scales: The scale values (one per tensor, or one per channel).
        zero_points: The zero-point values (same length as ``scales``; 0 when absent).
        axis: The channel axis of a per-channel node; None for per tensor.
        dtype: The integer type (``int8``, ``uint8``, ...).
    """

    node: str
    op: str
    tensor: str
    quantized: str
    layer: str
    consumers: List[str]
    scales: List[float]
    zero_points: List[int]
    axis: Optional[int]
    dtype: str

    @property
    def per_channel(self) -> bool:
        return len(self.scales) > 1

    def scale_text(self) -> str:
        """``"0.0123"`` per tensor; ``"64 ch: 0.001..0.03"`` per channel."""
        if not self.scales:
            return "-"
        if not self.per_channel:
            return f"{self.scales[0]:.6g}"
        return f"{len(self.scales)} ch, axis {self.axis}: {min(self.scales):.3g}..{max(self.scales):.3g}"

    def zero_point_text(self) -> str:
        values = sorted(set(self.zero_points))
        return ",".join(str(v) for v in values) if values else "0"

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["scale"] = self.scale_text()
        data["zero_point"] = self.zero_point_text()
        return data

    def cells(self) -> List[str]:
        """The row as text, in :data:`HEADERS` order."""
        return [self.node, self.op, self.quantized, self.tensor, self.layer or "-", "; ".join(self.consumers) or "-",
                self.scale_text(), self.zero_point_text(), self.dtype]


HEADERS = ["node", "op", "quantized", "tensor", "layer", "feeds", "scale", "zero point", "type"]


def _constants(graph: onnx.GraphProto) -> Dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def qdq_table(model: Union[onnx.ModelProto, str, Path]) -> List[QdqRow]:
    """One :class:`QdqRow` per QuantizeLinear / DequantizeLinear node of the main graph, in graph order.

    Args:
        model: An ONNX model or its file (loaded with external data).

    Raises:
        OnnxFormatError: a Q/DQ node whose scale is not a constant of the graph
            (then no table can say what it quantizes with).
    """
    if not isinstance(model, onnx.ModelProto):
        from quantlab.export.graph import load_onnx

        model = load_onnx(model, check=False)
    graph = model.graph
    constants = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    readers: Dict[str, List[str]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name:
                readers.setdefault(name, []).append(f"{node.op_type} {node.name or '?'} (input {index})")
    for output in graph.output:
        readers.setdefault(output.name, []).append("graph output")
    layers = _layers_by_tensor(model)
    rows: List[QdqRow] = []
    for node in graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        where = node.name or f"{node.op_type} -> {node.output[0] if node.output else '?'}"
        if len(node.input) < 2 or node.input[1] not in constants:
            raise OnnxFormatError(f"{where}: the scale is not a constant of the graph")
        scales = np.asarray(constants[node.input[1]], dtype=np.float64).reshape(-1)
        zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is not None:
            dtype = str(np.asarray(zero).dtype)
            zero_points = [int(v) for v in np.asarray(zero).reshape(-1)]
        else:
            dtype = "uint8" if node.op_type == "QuantizeLinear" else str(np.asarray(constants.get(node.input[0], np.zeros(0, np.uint8))).dtype)
            zero_points = [0] * len(scales)
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1) if scales.size > 1 else None
        data = node.input[0]
        rows.append(QdqRow(
            node=node.name, op="Q" if node.op_type == "QuantizeLinear" else "DQ", tensor=data,
            quantized="weight" if _is_weight(data, constants, producers) else "activation",
            layer=layers.get(data, ""), consumers=list(readers.get(node.output[0], [])) if node.output else [],
            scales=[float(s) for s in scales], zero_points=zero_points, axis=axis, dtype=dtype,
        ))
    _name_dq_layers(rows, producers, layers)
    return rows


def _is_weight(tensor: str, constants: Dict[str, np.ndarray], producers: Dict[str, onnx.NodeProto]) -> bool:
    """The tensor is a constant, or the output of a Q whose input is a constant (an unfolded weight Q -> DQ)."""
    if tensor in constants:
        return True
    node = producers.get(tensor)
    return node is not None and node.op_type == "QuantizeLinear" and node.input[0] in constants


def _layers_by_tensor(model: onnx.ModelProto) -> Dict[str, str]:
    """ONNX tensor -> quantlab quantizer key, from the file's tensor map (empty for other tools' files)."""
    from quantlab.export.mapping import read_tensor_map

    try:
        mapping = read_tensor_map(model)
    except OnnxFormatError:
        return {}
    out: Dict[str, str] = {}
    for key, tensor in mapping.items():
        out.setdefault(tensor, key)
    return out


def _name_dq_layers(rows: List[QdqRow], producers: Dict[str, onnx.NodeProto], layers: Dict[str, str]) -> None:
    """A DQ of an activation reads its Q's output: it belongs to the layer of that Q's input."""
    for row in rows:
        if row.layer or row.op != "DQ":
            continue
        source = producers.get(row.tensor)
        if source is not None and source.op_type == "QuantizeLinear":
            row.layer = layers.get(source.input[0], "")


__all__ = ["HEADERS", "QDQ_OPS", "QdqRow", "qdq_table"]
