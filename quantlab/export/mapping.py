"""Which ONNX node and tensor belongs to which PyTorch module quantizer.

A calibration cache is keyed by ONNX tensor names, a scales file by module
names (``block1.conv1:input``). This module finds, for each weighted node
(Conv, ConvTranspose, Gemm, MatMul), the module it came from, using in order:

1. quantlab's own record in the model metadata (``quantlab.tensor_map``);
2. the dynamo exporter's ``pkg.torch.onnx.name_scopes`` node metadata;
3. the TorchScript exporter's node-name scopes (``/block1/conv1/Conv``);
4. the weight initializer name (``block1.conv1.weight``).

The input quantizer of a module maps to the weighted node's data input (in a
Q/DQ graph: the tensor entering its QuantizeLinear).
"""
from __future__ import annotations

import ast
import json
from typing import Dict, Iterable, Optional, Sequence

import onnx

from quantlab.export.graph import WEIGHTED_OPS, GraphView

METADATA_KEY = "quantlab.tensor_map"
#: ~100 characters per quantizer: 64M characters is ~500k quantizers.
MAX_MAP_CHARS = 64 << 20
_WEIGHT_SUFFIXES = (".parametrizations.weight.original", ".weight", ".weight_quantized")


def torchscript_scope(module_name: str) -> str:
    """The node-name prefix the TorchScript exporter gives ops of ``module_name``.

    Each level is the module's attribute name, looking past purely numeric
    atoms (``stem.0`` -> ``/stem/stem.0``, ``block1.conv1`` -> ``/block1/conv1``),
    as ``torch.onnx.utils._unqualified_variable_name`` does.
    """
    atoms = module_name.split(".")
    parts = []
    for end in range(1, len(atoms) + 1):
        prefix = atoms[:end]
        start = 0
        for i in range(len(prefix) - 1, -1, -1):
            if not prefix[i].isdigit():
                start = i
                break
        parts.append(".".join(prefix[start:]))
    return "/" + "/".join(parts)


def _metadata(node: onnx.NodeProto, key: str) -> Optional[str]:
    for prop in node.metadata_props:
        if prop.key == key:
            return prop.value
    return None


class ModuleResolver:
    """Maps weighted nodes of a graph to module names from a known list."""

    def __init__(self, module_names: Iterable[str]) -> None:
        self.module_names = [m for m in module_names if m]
        self._known = set(self.module_names)
        # A GraphModule (a model rebuilt from .pt2/TorchScript) calls nested modules by their whole
        # dotted name, which the exporter keeps as one scope atom ("/stem.0"): accept both forms.
        self._scopes = {f"/{m}": m for m in self.module_names if "." in m}
        self._scopes.update({torchscript_scope(m): m for m in self.module_names})

    def module_of(self, view: GraphView, node: onnx.NodeProto) -> Optional[str]:
        scopes = _metadata(node, "pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                names = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                names = []
            if not isinstance(names, (list, tuple)):
                names = []
            for name in reversed(names):
                if name in self._known:
                    return name
        if node.name.startswith("/"):
            scope = node.name.rsplit("/", 1)[0]
            if scope in self._scopes:
                return self._scopes[scope]
        weight = weight_source_name(view, node)
        if weight:
            for suffix in _WEIGHT_SUFFIXES:
                if weight.endswith(suffix) and weight[: -len(suffix)] in self._known:
                    return weight[: -len(suffix)]
        return None


def weight_source_name(view: GraphView, node: onnx.NodeProto) -> Optional[str]:
    """Name of the constant behind a weighted node's weight input (through DQ/Transpose/Clip/Q)."""
    if len(node.input) < 2:
        return None
    name = node.input[1]
    for _ in range(4):
        if name in view.initializers:
            return name
        producer = view.producer.get(name)
        if producer is None or producer.op_type not in ("DequantizeLinear", "QuantizeLinear", "Transpose", "Clip", "Identity", "Cast"):
            return name if view.is_const(name) else None
        name = producer.input[0]
    return None


def data_input(view: GraphView, node: onnx.NodeProto) -> str:
    """The activation input of a weighted node (input 0, or the non-constant one of a MatMul)."""
    if node.op_type == "MatMul" and view.is_const(node.input[0]) and not view.is_const(node.input[1]):
        return node.input[1]
    return node.input[0]


_SHAPE_ONLY = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")


def quantized_source(view: GraphView, tensor: str) -> Optional[str]:
    """For ``tensor = DQ(Q(x))`` (possibly followed by shape-only ops) returns ``x``; else None."""
    dq = view.producer.get(tensor)
    hops = 0
    while dq is not None and dq.op_type in _SHAPE_ONLY and hops < 4:
        dq = view.producer.get(dq.input[0])
        hops += 1
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = view.producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    return q.input[0]


def build_tensor_map(view: GraphView, module_names: Sequence[str], *, quantized: bool) -> Dict[str, str]:
    """``{"module:input": tensor, "module:weight": initializer}`` for every resolvable weighted node.

    Args:
        view: The graph.
        module_names: Candidate module names (quantized layers or all quantizable ones).
        quantized: The graph has Q/DQ: map inputs to the tensor entering the QuantizeLinear.
    """
    resolver = ModuleResolver(module_names)
    mapping: Dict[str, str] = {}
    for node in view.nodes:
        if node.op_type not in WEIGHTED_OPS:
            continue
        module = resolver.module_of(view, node)
        if module is None or f"{module}:input" in mapping:
            continue
        activation = data_input(view, node)
        if quantized:
            activation = quantized_source(view, activation) or activation
        mapping[f"{module}:input"] = activation
        weight = weight_source_name(view, node)
        if weight:
            mapping[f"{module}:weight"] = weight
    return mapping


def read_tensor_map(model: onnx.ModelProto) -> Dict[str, str]:
    """quantlab's recorded quantizer -> tensor map of an exported model (empty if none).

    Raises:
        OnnxFormatError: the metadata is there but not a valid map (edited or corrupt file).
    """
    from quantlab.export.errors import OnnxFormatError
    from quantlab.validation import check_tensor_map, parse_json_text

    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            where = f"ONNX metadata {METADATA_KEY!r}"
            if len(prop.value) > MAX_MAP_CHARS:
                raise OnnxFormatError(f"{where}: {len(prop.value)} characters, more than any tensor map")
            data = parse_json_text(prop.value, where, error=OnnxFormatError)
            check_tensor_map(data, where, OnnxFormatError)
            return dict(data)
    return {}


def set_metadata(model: onnx.ModelProto, entries: Dict[str, str]) -> None:
    """Sets (replacing) string metadata entries of the model."""
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    for prop in keep:
        model.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def metadata(model: onnx.ModelProto) -> Dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


__all__ = [
    "METADATA_KEY",
    "ModuleResolver",
    "build_tensor_map",
    "data_input",
    "metadata",
    "quantized_source",
    "read_tensor_map",
    "set_metadata",
    "torchscript_scope",
    "weight_source_name",
]
