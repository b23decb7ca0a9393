"""Is each layer's weight 2:4 along the axis TensorRT's sparse kernels need, and can the layer use them?

Two views of the same question:

* :func:`check_model_sparsity` on a PyTorch model: the stored weights of every
  prunable layer (and whether a mask holds them).
* :func:`check_onnx_sparsity` on an exported ONNX file: the weights as TensorRT
  will read them; for a Q/DQ model these are the INT8 initializers behind each
  weight DequantizeLinear, i.e. after quantization (a weight that was 2:4 in
  float stays 2:4 in INT8, since 0 quantizes to 0, but a checker must look).

The reduction (input-channel) axis of the stored initializer is: Conv ``[K, C, R, S]``
axis 1; Gemm ``B`` axis 1 with ``transB=1`` (PyTorch's Linear) and axis 0 without;
MatMul ``B`` ``[..., K, N]`` axis -2. A layer is *eligible* when that dimension is a
multiple of 4 (per group for a grouped conv); ConvTranspose has no sparse kernels.
TensorRT still decides per layer, by timing, whether the sparse kernel is faster.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
from torch import nn

from quantlab.sparsity.mask import iter_masks
from quantlab.sparsity.pattern import M, N, PATTERN, ineligible_reason, input_axis, stored_weight


@dataclasses.dataclass
class LayerSparsity:
    """One layer's verdict.

    Attributes:
        layer: Module name (PyTorch) or node name (ONNX, with the module in ``module`` when known).
        op: Module type or ONNX operator.
        weight: Weight tensor name (ONNX) or ``weight``.
        shape: Weight shape.
        dtype: Weight element type (``int8`` for a Q/DQ weight).
        axis: The input-channel axis checked.
        eligible: The layer's shape allows sparse kernels.
        reason: Why not, when not eligible.
        compliant: The weight is 2:4 along ``axis`` (False when not eligible).
        violations: Groups of 4 with more than 2 non-zeros.
        groups: All groups of 4 along ``axis``.
        masked: A sparsity mask holds the layer (PyTorch view only).
        module: The PyTorch module the ONNX node came from (ONNX view, quantlab exports).
    """

    layer: str
    op: str
    weight: str
    shape: List[int]
    dtype: str
    axis: Optional[int]
    eligible: bool
    reason: str
    compliant: bool
    violations: int
    groups: int
    masked: Optional[bool] = None
    module: Optional[str] = None

    @property
    def density(self) -> float:
        """Fraction of groups that hold the pattern."""
        return 1.0 - self.violations / self.groups if self.groups else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SparsityReport:
    """Per-layer verdicts for a model or an ONNX file."""

    source: str
    pattern: str
    layers: List[LayerSparsity]

    @property
    def compliant(self) -> List[LayerSparsity]:
        return [layer for layer in self.layers if layer.compliant]

    @property
    def eligible_not_compliant(self) -> List[LayerSparsity]:
        """Layers that could run sparse but whose weight breaks the pattern."""
        return [layer for layer in self.layers if layer.eligible and not layer.compliant]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "source": self.source, "pattern": self.pattern,
            "num_layers": len(self.layers), "num_eligible": sum(layer.eligible for layer in self.layers),
            "num_compliant": len(self.compliant), "layers": [layer.to_dict() for layer in self.layers],
        }


def _verdict(values: np.ndarray, axis: int) -> "tuple[int, int]":
    moved = np.moveaxis(values != 0, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // M, M).sum(axis=-1)
    return int((groups > N).sum()), int(groups.size)


def layer_verdict(layer: str, op: str, weight_name: str, values: np.ndarray, axis: Optional[int], reason: Optional[str], **extra: Any) -> LayerSparsity:
    """The verdict for one weight array checked along ``axis`` (``reason``: why it is not eligible)."""
    eligible = reason is None and axis is not None
    violations, groups = _verdict(values, axis) if eligible else (0, 0)  # type: ignore[arg-type]
    return LayerSparsity(layer, op, weight_name, [int(d) for d in values.shape], str(values.dtype), axis, eligible,
                         reason or "", eligible and violations == 0, violations, groups, **extra)


def check_model_sparsity(model: nn.Module) -> SparsityReport:
    """2:4 verdicts for every Linear / Conv layer of a PyTorch model (its stored weights)."""
    from quantlab.registry import lookup_quantizable

    masked = {(ref.module_name, ref.weight_name) for ref in iter_masks(model)}
    layers = []
    for name, module in model.named_modules():
        entry = lookup_quantizable(module)
        if entry is None:
            continue
        weight = stored_weight(module, entry.weight_name).detach()
        axis = input_axis(module)
        reason = ineligible_reason(module, weight, axis)
        layers.append(layer_verdict(name, type(module).__name__, entry.weight_name, weight.cpu().numpy(), axis, reason,
                                    masked=(name, entry.weight_name) in masked))
    return SparsityReport(type(model).__name__, PATTERN, layers)


def _reduction_axis(node: Any, ndim: int) -> Optional[int]:
    from quantlab.export.graph import get_attr

    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if get_attr(node, "transB", 0) else 0
    if node.op_type == "MatMul":
        return ndim - 2 if ndim >= 2 else None
    return None


def _weight_as_seen(view: Any, tensor: str, depth: int = 0) -> "tuple[str, Optional[np.ndarray]]":
    """The initializer behind a weighted op's weight input (through DQ and Transpose), as the op sees it."""
    from quantlab.export.graph import get_attr

    node = view.producer.get(tensor)
    if node is None:
        return tensor, view.const(tensor)
    if node.op_type == "DequantizeLinear":
        return node.input[0], view.const(node.input[0])
    if node.op_type == "Transpose" and depth < 3:
        name, values = _weight_as_seen(view, node.input[0], depth + 1)
        if values is None:
            return name, None
        perm = get_attr(node, "perm") or list(reversed(range(values.ndim)))
        return name, np.transpose(values, perm)
    return tensor, view.const(tensor)


def check_onnx_sparsity(model: "Union[str, Path, Any]") -> SparsityReport:
    """2:4 verdicts for every weighted node of an ONNX model with a constant weight.

    The weight is the INT8 initializer behind a DequantizeLinear when there is one
    (seen through a Transpose between them), else the float initializer.
    """
    import onnx

    from quantlab.export.graph import WEIGHTED_OPS, GraphView, get_attr, load_onnx, node_label
    from quantlab.export.mapping import read_tensor_map

    source = "<model>"
    if not isinstance(model, onnx.ModelProto):
        source = str(model)
        model = load_onnx(model, check=False)
    view = GraphView(onnx.ModelProto.FromString(model.SerializeToString()))
    view.constants_to_initializers()
    owners = {tensor: key.rsplit(":", 1)[0] for key, tensor in read_tensor_map(model).items() if key.endswith(":weight")}
    layers = []
    for node in view.nodes:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        tensor = node.input[1]
        name, values = _weight_as_seen(view, tensor)
        if values is None:
            continue  # an activation x activation MatMul, or a weight computed in the graph
        axis = _reduction_axis(node, values.ndim)
        reason = None
        if node.op_type == "ConvTranspose":
            reason = "ConvTranspose has no sparse kernels in TensorRT (only Conv and fully connected layers do)"
        elif axis is None:
            reason = f"{node.op_type} weight of rank {values.ndim} has no input-channel axis"
        elif values.shape[axis] % M:
            groups = int(get_attr(node, "group", 1) or 1)
            per_group = f" (per group of a {groups}-group conv)" if groups > 1 else ""
            reason = f"input dimension {values.shape[axis]}{per_group} is not a multiple of {M}"
        layers.append(layer_verdict(node_label(node), node.op_type, name, values, axis, reason,
                                    module=owners.get(name) or owners.get(tensor)))
    return SparsityReport(source, PATTERN, layers)


@dataclasses.dataclass
class ExportSparsity:
    """Whether an export kept the 2:4 pattern of a pruned model.

    Attributes:
        report: The exported file's per-layer verdicts (:func:`check_onnx_sparsity`).
        sparse_in_model: Layers whose weights are 2:4 in the PyTorch model.
        lost: Those among them that are not 2:4 in the exported weights.
    """

    report: SparsityReport
    sparse_in_model: List[str]
    lost: List[str]

    @property
    def problem(self) -> Optional[str]:
        """Why the export does not carry the pattern (None when it does)."""
        if not self.sparse_in_model:
            return "2:4: no layer of the model holds the pattern: prune it first (quantlab prune, or quantlab qat --sparsity 2:4)"
        if self.lost:
            return f"2:4: the pattern was lost in the export for: {', '.join(self.lost)}"
        return None


def check_export_sparsity(model: nn.Module, onnx_path: "Union[str, Path, Any]") -> ExportSparsity:
    """Every layer that is 2:4 in ``model`` must be 2:4 in the exported weights (INT8 for a Q/DQ export)."""
    onnx_report = check_onnx_sparsity(onnx_path)
    sparse_in_model = [layer.layer for layer in check_model_sparsity(model).layers if layer.compliant]
    wanted = set(sparse_in_model)
    lost = [layer.module or layer.layer for layer in onnx_report.layers if layer.module in wanted and not layer.compliant]
    return ExportSparsity(onnx_report, sparse_in_model, lost)


def format_table(report: SparsityReport) -> "tuple[list, list]":
    """Rows and headers for a printed table (the CLI)."""
    headers = ["layer", "op", "weight", "shape", "dtype", "eligible", f"{PATTERN}", "bad groups"]
    rows = []
    for layer in report.layers:
        label = layer.module or layer.layer
        verdict = "yes" if layer.compliant else ("no" if layer.eligible else "-")
        eligible = "yes" if layer.eligible else f"no: {layer.reason}"
        bad = f"{layer.violations}/{layer.groups}" if layer.eligible else "-"
        rows.append([label, layer.op, layer.weight, "x".join(str(d) for d in layer.shape), layer.dtype, eligible, verdict, bad])
    return rows, headers


__all__ = ["ExportSparsity", "LayerSparsity", "SparsityReport", "check_export_sparsity", "check_model_sparsity", "check_onnx_sparsity", "format_table", "layer_verdict"]
