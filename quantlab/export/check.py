"""``quantlab check``: Q/DQ placement and format rules of TensorRT, per node, for any ONNX model.

Errors are what TensorRT's ONNX parser rejects or cannot build as explicit INT8
(they exit 1); warnings are what builds but makes INT8 slower than it should be
(often slower than FP16) or runs part of the network in floating point.

Rules (see ``shared/reference/tensorrt-int8.md``):

==========================  ========  =================================================================
rule                        severity  what it catches
==========================  ========  =================================================================
invalid-model               error     onnx.checker rejects the graph (TensorRT's parser would too)
opset-too-low               error     default opset < 13 (no per-channel ``axis`` on Q/DQ)
fp16-scale-opset            error     FP16 Q/DQ scales below opset 19
non-constant-qparams        error     scale / zero point computed in the graph (e.g. Abs/ReduceMax -> Q)
scale-not-positive          error     a scale <= 0, NaN or Inf
scale-subnormal             error     a scale below the smallest normal of its dtype (the GPU flushes it to 0)
invalid-metadata            error     quantlab's tensor map metadata is not valid (edited or corrupt file)
asymmetric-zero-point       error     a zero point that is not 0
uint8-inside-network        error     UINT8 Q/DQ (or a missing zero point, which means UINT8) away from network I/O
per-channel-activation      error     a per-channel scale on a non-constant (activation) tensor
weight-axis                 error     per-channel weight scale on an axis that is not the output channels
weighted-input-not-quantized warning  Conv/ConvTranspose/Gemm/MatMul whose input or weight has no DQ
residual-not-quantized      warning   Add of a weighted op's output and an unquantized skip tensor
concat-scale-mismatch       warning   Concat inputs dequantized with different scales
qdq-between-pad-and-conv    warning   Pad -> Q -> DQ -> Conv (blocks the Pad+Conv fusion)
qdq-splits-fusion           warning   weighted op -> Q -> DQ -> BatchNormalization/Relu (splits Conv+BN+ReLU)
unpaired-quantize           warning   a QuantizeLinear not followed by DequantizeLinear
no-qdq                      info      the model holds no Q/DQ at all (TensorRT builds it FP16/FP32)
==========================  ========  =================================================================
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import onnx

from quantlab.export.graph import WEIGHTED_OPS, GraphView, default_opset, get_attr, load_onnx, node_label
from quantlab.export.placement import from_weighted_op

ERROR = "error"
WARNING = "warning"
INFO = "info"
_SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}

RULES = {
    "invalid-model": ERROR,
    "opset-too-low": ERROR,
    "fp16-scale-opset": ERROR,
    "non-constant-qparams": ERROR,
    "scale-not-positive": ERROR,
    "scale-subnormal": ERROR,
    "invalid-metadata": ERROR,
    "asymmetric-zero-point": ERROR,
    "uint8-inside-network": ERROR,
    "per-channel-activation": ERROR,
    "weight-axis": ERROR,
    "weighted-input-not-quantized": WARNING,
    "residual-not-quantized": WARNING,
    "concat-scale-mismatch": WARNING,
    "qdq-between-pad-and-conv": WARNING,
    "qdq-splits-fusion": WARNING,
    "unpaired-quantize": WARNING,
    "no-qdq": INFO,
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One rule violation at one node."""

    rule: str
    severity: str
    node: str
    op_type: str
    message: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CheckReport:
    """All findings for one model."""

    source: str
    findings: List[Finding]
    num_nodes: int
    num_qdq: int
    num_weighted: int
    num_weighted_quantized: int
    opset: int

    @property
    def errors(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def rules_hit(self) -> List[str]:
        return sorted({f.rule for f in self.findings})

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "ok": self.ok,
            "opset": self.opset,
            "num_nodes": self.num_nodes,
            "num_qdq": self.num_qdq,
            "num_weighted": self.num_weighted,
            "num_weighted_quantized": self.num_weighted_quantized,
            "findings": [f.to_dict() for f in self.findings],
        }


class _Checker:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.view = GraphView(onnx.ModelProto.FromString(model.SerializeToString()))
        self.findings: List[Finding] = []

    def add(self, rule: str, node: Optional[onnx.NodeProto], message: str) -> None:
        label = node_label(node) if node is not None else "<model>"
        self.findings.append(Finding(rule, RULES[rule], label, node.op_type if node is not None else "", message))

    # -- helpers ---------------------------------------------------------------------------
    def _zero_point_type(self, node: onnx.NodeProto) -> Optional[int]:
        """ONNX element type of a Q/DQ node's integer side."""
        if len(node.input) > 2 and node.input[2]:
            zp = self.view.const(node.input[2])
            if zp is not None:
                return onnx.helper.np_dtype_to_tensor_dtype(zp.dtype)
            return None
        dtype = get_attr(node, "output_dtype", 0) if node.op_type == "QuantizeLinear" else 0
        if dtype:
            return int(dtype)
        if node.op_type == "DequantizeLinear":
            source = self.view.producer.get(node.input[0])
            if source is not None and source.op_type == "QuantizeLinear":
                return self._zero_point_type(source)
            value = self.view.const(node.input[0])
            if value is not None:
                return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        return onnx.TensorProto.UINT8  # ONNX's default for QuantizeLinear without zero point

    def _at_network_io(self, node: onnx.NodeProto) -> bool:
        if node.op_type == "QuantizeLinear":
            return node.input[0] in self.view.graph_inputs
        return node.output[0] in self.view.graph_outputs

    def _data_input_is_constant(self, node: onnx.NodeProto) -> bool:
        if node.op_type == "QuantizeLinear":
            return self.view.is_const(node.input[0])
        source = self.view.producer.get(node.input[0])
        if self.view.is_const(node.input[0]):
            return True
        return source is not None and source.op_type == "QuantizeLinear" and self.view.is_const(source.input[0])

    # -- rules -----------------------------------------------------------------------------
    def check_opset(self) -> None:
        opset = default_opset(self.model)
        if opset < 13:
            self.add("opset-too-low", None, f"default opset is {opset}; per-channel Q/DQ and TensorRT's INT8 parser need opset >= 13 (re-export with opset 13-25)")

    def check_qdq_node(self, node: onnx.NodeProto) -> None:
        v = self.view
        scale_name = node.input[1] if len(node.input) > 1 else ""
        scale = v.const(scale_name)
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zero_point = v.const(zp_name) if zp_name else None
        if scale is None or (zp_name and zero_point is None):
            what = "scale" if scale is None else "zero point"
            producer = v.producer.get(scale_name if scale is None else zp_name)
            how = f" (computed by {producer.op_type} '{node_label(producer)}')" if producer is not None else " (a graph input)"
            self.add("non-constant-qparams", node, f"{what} '{scale_name if scale is None else zp_name}' is not a build-time constant{how}; TensorRT needs constant scales and zero points: fold constants or take scales from stored amax")
            return
        if scale.dtype == np.float16 and default_opset(self.model) < 19:
            self.add("fp16-scale-opset", node, "FP16 scale needs opset >= 19; keep scales float32")
        flat = scale.reshape(-1)
        if not np.all(np.isfinite(flat)) or np.any(flat <= 0):
            bad = flat[~(np.isfinite(flat) & (flat > 0))]
            self.add("scale-not-positive", node, f"scale '{scale_name}' holds {bad.size} value(s) that are not finite and > 0 (e.g. {float(bad[0])!r}); TensorRT requires scale > 0")
        elif flat.dtype in (np.float16, np.float32) and np.any(flat < np.finfo(flat.dtype).tiny):
            bad = flat[flat < np.finfo(flat.dtype).tiny]
            self.add("scale-subnormal", node, f"scale '{scale_name}' holds {bad.size} subnormal {flat.dtype} value(s) (e.g. {float(bad[0])!r} < {float(np.finfo(flat.dtype).tiny):.3g}): the GPU flushes them to 0, so every value quantizes to 0 or overflows; recalibrate or keep the layer in floating point")
        if zero_point is not None and np.any(zero_point != 0):
            self.add("asymmetric-zero-point", node, f"zero point '{zp_name}' is {_brief(zero_point)}, not 0; TensorRT supports only symmetric quantization (zero point 0)")
        ztype = self._zero_point_type(node)
        if ztype == onnx.TensorProto.UINT8 and not self._at_network_io(node):
            hint = "" if zp_name else " (no zero point given: ONNX then means UINT8)"
            self.add("uint8-inside-network", node, f"UINT8 quantization inside the network{hint}; TensorRT accepts UINT8 only on network inputs/outputs: use INT8 with zero point 0")
        per_channel = scale.size > 1
        if per_channel and not self._data_input_is_constant(node):
            self.add("per-channel-activation", node, f"per-channel scale ({scale.size} values, axis {get_attr(node, 'axis', 1)}) on activation '{node.input[0]}'; TensorRT quantizes activations per tensor only")

    def check_weighted(self, node: onnx.NodeProto) -> bool:
        """Returns whether the node's inputs are quantized."""
        v = self.view
        if len(node.input) < 2:
            return False
        inputs = list(node.input[:2])
        unquantized = []
        for index, tensor in enumerate(inputs):
            constant = v.is_const(tensor)
            dq = self._dq_behind(tensor)
            if dq is None:
                unquantized.append(("weight" if constant or index == 1 else "input") + f" '{tensor}'")
                continue
            if index == 1:
                self._check_weight_axis(node, dq, tensor)
        if unquantized:
            self.add(
                "weighted-input-not-quantized", node,
                f"{' and '.join(unquantized)} not quantized (no DequantizeLinear): this {node.op_type} runs in FP16/FP32"
                " (fine for a layer kept in floating point on purpose)",
            )
            return False
        return True

    def _dq_behind(self, tensor: str) -> Optional[onnx.NodeProto]:
        """The DQ feeding ``tensor`` directly or through a Transpose/Reshape of a weight."""
        node = self.view.producer.get(tensor)
        hops = 0
        while node is not None and node.op_type in ("Transpose", "Reshape", "Unsqueeze", "Squeeze") and hops < 3:
            node = self.view.producer.get(node.input[0])
            hops += 1
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def _check_weight_axis(self, node: onnx.NodeProto, dq: onnx.NodeProto, tensor: str) -> None:
        scale = self.view.const(dq.input[1])
        weight = self.view.const(dq.input[0])
        if weight is None:
            source = self.view.producer.get(dq.input[0])
            if source is not None and source.op_type == "QuantizeLinear":
                weight = self.view.const(source.input[0])
        if scale is None or scale.size <= 1 or weight is None:
            return
        axis = get_attr(dq, "axis", 1) % weight.ndim
        # Follow a Transpose between the DQ and the weighted op.
        between = self.view.producer.get(tensor)
        if between is not None and between.op_type == "Transpose":
            perm = list(get_attr(between, "perm") or reversed(range(weight.ndim)))
            axis = perm.index(axis)
            ndim = weight.ndim
        else:
            ndim = weight.ndim
        expected = _output_channel_axis(node, ndim)
        if expected is not None and axis != expected:
            self.add("weight-axis", node, f"weight '{dq.input[0]}' is quantized per channel on axis {axis}, but the output channels of this {node.op_type} are on axis {expected}")

    def check_residual(self, node: onnx.NodeProto) -> None:
        v = self.view
        if len(node.input) != 2 or any(v.is_const(i) for i in node.input):
            return
        for branch, skip in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            if from_weighted_op(v, branch) and not from_weighted_op(v, skip) and self._dq_behind(skip) is None:
                conv = v.producer.get(branch)
                if not self._weighted_is_quantized(branch):
                    return
                self.add("residual-not-quantized", node, f"skip input '{skip}' of this Add is not quantized while '{branch}' comes from {conv.op_type if conv else '?'}: add Q/DQ on the skip so TensorRT fuses the Add into the conv (else INT8 can be slower than FP16)")
                return

    def _weighted_is_quantized(self, tensor: str) -> bool:
        node = self.view.producer.get(tensor)
        while node is not None and node.op_type not in WEIGHTED_OPS:
            node = self.view.producer.get(node.input[0])
        return node is not None and self._dq_behind(node.input[0]) is not None

    def check_concat(self, node: onnx.NodeProto) -> None:
        scales = []
        for tensor in node.input:
            dq = self.view.producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                return
            scale = self.view.const(dq.input[1])
            if scale is None or scale.size != 1:
                return
            scales.append(float(scale.reshape(())))
        if len(set(scales)) > 1:
            self.add("concat-scale-mismatch", node, f"inputs are dequantized with {len(set(scales))} different scales ({min(scales):.6g} .. {max(scales):.6g}); give all Concat inputs one scale (e.g. the max) so TensorRT needs no re-quantization")

    def check_pad(self, q: onnx.NodeProto) -> None:
        pad = self.view.producer.get(q.input[0])
        if pad is None or pad.op_type != "Pad":
            return
        for dq in self.view.uses(q.output[0]):
            if dq.op_type == "DequantizeLinear" and any(c.op_type == "Conv" for c in self.view.uses(dq.output[0])):
                self.add("qdq-between-pad-and-conv", q, f"Q/DQ sits between Pad '{node_label(pad)}' and a Conv; move it before the Pad so TensorRT can fuse Pad into the Conv")
                return

    def check_q_after_weighted(self, q: onnx.NodeProto) -> None:
        source = self.view.producer.get(q.input[0])
        if source is None or source.op_type not in WEIGHTED_OPS:
            return
        for dq in self.view.uses(q.output[0]):
            if dq.op_type != "DequantizeLinear":
                continue
            follow = [c.op_type for c in self.view.uses(dq.output[0]) if c.op_type in ("BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSwish")]
            if follow:
                self.add("qdq-splits-fusion", q, f"Q/DQ between {source.op_type} '{node_label(source)}' and {follow[0]} splits a pattern TensorRT fuses (Conv+BN+ReLU); quantize after the activation instead")
                return

    def check_pairing(self, q: onnx.NodeProto) -> None:
        users = self.view.uses(q.output[0])
        if q.output[0] in self.view.graph_outputs:
            return
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            other = next((u.op_type for u in users if u.op_type != "DequantizeLinear"), "nothing")
            self.add("unpaired-quantize", q, f"QuantizeLinear output feeds {other}, not DequantizeLinear; TensorRT expects Q->DQ pairs")

    def check_metadata(self) -> None:
        from quantlab.export.errors import OnnxFormatError
        from quantlab.export.mapping import read_tensor_map

        try:
            read_tensor_map(self.model)
        except OnnxFormatError as exc:
            self.add("invalid-metadata", None, str(exc))

    def run(self) -> CheckReport:
        try:
            onnx.checker.check_model(self.model)
        except Exception as exc:  # noqa: BLE001 - ValidationError and protobuf errors
            self.add("invalid-model", None, f"onnx.checker rejects the model: {str(exc).strip().splitlines()[0][:300]}")
        self.check_metadata()
        self.view.constants_to_initializers()
        self.check_opset()
        nodes = list(self.view.nodes)
        qdq = [n for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        weighted = [n for n in nodes if n.op_type in WEIGHTED_OPS and len(n.input) >= 2]
        if not qdq:
            self.add("no-qdq", None, "no QuantizeLinear/DequantizeLinear in the model: TensorRT's strongly typed builder will build it in its own float precision")
        for node in qdq:
            self.check_qdq_node(node)
        quantized_weighted = 0
        if qdq:
            for node in weighted:
                if node.op_type == "MatMul" and not any(self.view.is_const(i) or self._dq_behind(i) for i in node.input[:2]):
                    continue  # a float activation x activation MatMul that nothing tried to quantize
                quantized_weighted += int(self.check_weighted(node))
            for node in nodes:
                if node.op_type == "Add":
                    self.check_residual(node)
                elif node.op_type == "Concat":
                    self.check_concat(node)
                elif node.op_type == "QuantizeLinear":
                    self.check_pad(node)
                    self.check_q_after_weighted(node)
                    self.check_pairing(node)
        findings = sorted(self.findings, key=lambda f: (_SEVERITY_ORDER[f.severity], f.rule, f.node))
        return CheckReport(
            source="",
            findings=findings,
            num_nodes=len(nodes),
            num_qdq=len(qdq),
            num_weighted=len(weighted),
            num_weighted_quantized=quantized_weighted,
            opset=default_opset(self.model),
        )


def _output_channel_axis(node: onnx.NodeProto, ndim: int) -> Optional[int]:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if get_attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return ndim - 1
    return None


def _brief(values: np.ndarray) -> str:
    flat = np.asarray(values).reshape(-1)
    return str(flat.tolist()) if flat.size <= 4 else f"[{', '.join(str(v) for v in flat[:4].tolist())}, ...]"


def check_model(model: Union[onnx.ModelProto, str, Path]) -> CheckReport:
    """Checks an ONNX model (object or path) against TensorRT's Q/DQ rules.

    Raises:
        FileNotFoundError / OnnxFormatError: for a missing, non-ONNX or truncated file.
    """
    source = "<model>"
    if not isinstance(model, onnx.ModelProto):
        source = str(model)
        model = load_onnx(model, check=False)
    report = _Checker(model).run()
    report.source = source
    return report


def findings_for(report: CheckReport, rule: str) -> List[Finding]:
    return [f for f in report.findings if f.rule == rule]


__all__ = ["CheckReport", "ERROR", "Finding", "INFO", "RULES", "WARNING", "check_model", "findings_for"]
