"""Is an ONNX file's integer arithmetic exact on THIS CPU? Checked before ONNX Runtime runs it.

A model exported on a VNNI machine in the u8s8 form computes wrong numbers on an
AVX2-only CPU (:mod:`quantlab.runtimes.onnxruntime.forms`). :func:`verify_model` reads the
form the file records (``quantlab.ort_int8*`` metadata) and, from the graph itself,
every integer kernel ONNX Runtime will run for it (explicit ``QLinearConv``,
``ConvInteger``, ``MatMulInteger*``, ``QGemm``... and the ``DQ -> Conv -> Q`` /
``DQ -> MatMul`` patterns ONNX Runtime fuses into them) with its activation and
weight types; it refuses, naming the layer kind and the fix, where this CPU's probe
found that kind inexact. It works on files from other tools too (no metadata: the
form is read from the graph).
"""
from __future__ import annotations

import dataclasses
import platform
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper

from quantlab.export.graph import GraphView, get_attr, node_label
from quantlab.runtimes.onnxruntime import forms as ort_forms
from quantlab.runtimes.onnxruntime.forms import FORMS, OrtFormError, FormChoice, ProbeResult, choose_form, chosen_on

METADATA_FORM = "quantlab.ort_int8"
METADATA_REQUESTED = "quantlab.ort_int8.requested"
METADATA_WEIGHT_BITS = "quantlab.ort_int8.weight_bits"
METADATA_CHOSEN_ON = "quantlab.ort_int8.chosen_on"


def form_metadata(choice: FormChoice) -> Dict[str, str]:
    """The metadata_props an ort-cpu export records (form, what was asked, weight bits, where chosen)."""
    return {
        METADATA_FORM: choice.form,
        METADATA_REQUESTED: choice.requested,
        METADATA_WEIGHT_BITS: str(choice.weight_bits),
        METADATA_CHOSEN_ON: chosen_on(choice.probe),
    }


@dataclasses.dataclass(frozen=True)
class RecordedForm:
    """The form an exported file records."""

    form: str
    requested: str
    weight_bits: int
    chosen_on: str

    def describe(self) -> str:
        asked = "auto" if self.requested == "auto" else "forced"
        bits = "" if self.weight_bits == 8 else f", {self.weight_bits}-bit weights (reduce_range)"
        return f"{self.form} ({asked}{bits}; chosen on {self.chosen_on or 'an unrecorded machine'})"


def recorded_form(model: onnx.ModelProto, source: str = "<model>") -> Optional[RecordedForm]:
    """The ``quantlab.ort_int8*`` metadata of ``model`` (None when it records none).

    Raises:
        OrtFormError: a recorded field is not one quantlab writes.
    """
    meta = {p.key: p.value for p in model.metadata_props}
    if METADATA_FORM not in meta:
        return None
    form, requested = meta[METADATA_FORM], meta.get(METADATA_REQUESTED, "auto")
    bits, where = meta.get(METADATA_WEIGHT_BITS, "8"), meta.get(METADATA_CHOSEN_ON, "")
    if form not in FORMS:
        raise OrtFormError(f"{source}: metadata {METADATA_FORM} is {form[:40]!r}, not one of {', '.join(FORMS)}")
    if requested not in ("auto",) + FORMS:
        raise OrtFormError(f"{source}: metadata {METADATA_REQUESTED} is {requested[:40]!r}, not auto or a form")
    if bits not in ("7", "8"):
        raise OrtFormError(f"{source}: metadata {METADATA_WEIGHT_BITS} is {bits[:40]!r}, not 7 or 8")
    return RecordedForm(form, requested, int(bits), where[:300])


@dataclasses.dataclass(frozen=True)
class IntegerKernel:
    """One layer ONNX Runtime runs on integer kernels.

    Attributes:
        node: The node (or the Conv / MatMul of a fused DQ pattern).
        op: The kernel (``QLinearConv``, ``ConvInteger``, ``MatMulIntegerToFloat``, ...).
        probe_op: The probed op that uses the same MLAS kernel (:data:`~quantlab.runtimes.onnxruntime.forms.PROBED_OPS`).
        form: ``"u8s8"`` or ``"u8u8"`` (activation x weight types), or ``"s8s8"``/``"s8u8"`` (not probed).
        weight_bits: 7 when every weight value fits in [-64, 64] (a u8 x s8 pair cannot saturate), else 8.
        fused: ONNX Runtime makes it from a Q/DQ pattern (it is not a node of the file).
    """

    node: str
    op: str
    probe_op: str
    form: str
    weight_bits: int
    fused: bool = False

    @property
    def kind(self) -> str:
        return f"{self.op} {self.form}"


# op -> (activation input index, or None for a dynamically quantized UINT8 input; weight index; probe op)
_EXPLICIT = {
    "QLinearConv": (0, 3, "QLinearConv"),
    "ConvInteger": (0, 1, "ConvInteger"),
    "MatMulInteger": (0, 1, "MatMulInteger"),
    "MatMulIntegerToFloat": (0, 1, "MatMulIntegerToFloat"),
    "QLinearMatMul": (0, 3, "MatMulInteger"),
    "QGemm": (0, 3, "MatMulInteger"),
    "DynamicQuantizeMatMul": (None, 1, "MatMulInteger"),
    "QAttention": (0, 1, "MatMulInteger"),
}
# Ops whose output has the element type of their first input.
_SAME_TYPE = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Pad", "Slice", "Concat", "MaxPool",
              "Clip", "Relu", "Identity", "Gather", "Split", "Expand", "Tile", "DepthToSpace", "SpaceToDepth")


class _Types:
    """Element types of tensors: constants, declared types, and a walk back through Q and shape ops."""

    def __init__(self, view: GraphView) -> None:
        self.view = view
        self.declared: Dict[str, int] = {}
        for info in list(view.graph.input) + list(view.graph.value_info) + list(view.graph.output):
            elem = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else 0
            if elem:
                self.declared[info.name] = elem

    def dtype(self, tensor: str, depth: int = 0) -> Optional[np.dtype]:
        value = self.view.const(tensor)
        if value is not None:
            return value.dtype
        if tensor in self.declared:
            try:
                return np.dtype(helper.tensor_dtype_to_np_dtype(self.declared[tensor]))
            except (KeyError, TypeError, ValueError):
                return None
        node = self.view.producer.get(tensor)
        if node is None or depth > 64:
            return None
        if node.op_type == "QuantizeLinear":
            zero = self.view.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if zero is not None:
                return zero.dtype
            out = int(get_attr(node, "output_dtype", 0) or 0)
            return np.dtype(helper.tensor_dtype_to_np_dtype(out)) if out else np.dtype(np.uint8)
        if node.op_type == "DynamicQuantizeLinear":
            return np.dtype(np.uint8)
        if node.op_type == "DequantizeLinear" or node.op_type.startswith("QLinear"):
            # DQ: the type of its integer input (given by the zero point where there is one).
            zero = self.view.const(node.input[2]) if node.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2] else None
            if zero is not None:
                return zero.dtype
            return self.dtype(node.input[0], depth + 1)
        if node.op_type in _SAME_TYPE and node.input:
            return self.dtype(node.input[0], depth + 1)
        return None


def _form_of(activation: Optional[np.dtype], weight: Optional[np.dtype]) -> str:
    a = "s8" if activation == np.int8 else "u8"  # unknown activations: UINT8, what x86 integer kernels take
    w = "u8" if weight == np.uint8 else "s8"
    return a + w


def _weight_bits(view: GraphView, tensor: str, dtype: Optional[np.dtype]) -> int:
    value = view.const(tensor)
    if dtype != np.int8 or value is None or value.size == 0:
        return 8
    return 7 if int(np.abs(value.astype(np.int16)).max()) <= 64 else 8


def _dq_source(view: GraphView, tensor: str) -> Optional[onnx.NodeProto]:
    node = view.producer.get(tensor)
    return node if node is not None and node.op_type == "DequantizeLinear" else None


_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def integer_kernels(model: onnx.ModelProto, *, qdq_fusion: bool = True, machine: Optional[str] = None) -> List[IntegerKernel]:
    """Every layer of ``model`` that ONNX Runtime's CPU provider runs on integer kernels.

    Args:
        model: The ONNX model.
        qdq_fusion: Whether the session fuses Q/DQ patterns (``session.disable_quant_qdq``
            off); without it only explicit integer nodes run on integer kernels.
        machine: ``platform.machine()`` (default: this one). On x86 ONNX Runtime turns
            the INT8 activations of fused Q/DQ patterns into UINT8 (QDQS8ToU8: u8 x s8
            is its fast path), so such a pattern runs u8s8.
    """
    x86 = (machine or platform.machine()).lower() in _X86
    view = GraphView(model)  # read only: nothing is committed back to ``model``
    view.constants_to_initializers()
    types = _Types(view)
    kernels: List[IntegerKernel] = []
    for node in view.nodes:
        if node.op_type in _EXPLICIT and node.domain in ("", "ai.onnx", "com.microsoft"):
            a_index, w_index, probe_op = _EXPLICIT[node.op_type]
            if len(node.input) <= w_index:
                continue
            a_type = np.dtype(np.uint8) if a_index is None else types.dtype(node.input[a_index])
            w_type = types.dtype(node.input[w_index])
            kernels.append(IntegerKernel(node_label(node), node.op_type, probe_op, _form_of(a_type, w_type),
                                         _weight_bits(view, node.input[w_index], w_type)))
        elif qdq_fusion and node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) >= 2:
            # The QDQ patterns ORT fuses: DQ -> Conv -> Q (QLinearConv), DQ -> MatMul/Gemm [-> Q].
            a_dq, w_dq = _dq_source(view, node.input[0]), _dq_source(view, node.input[1])
            if a_dq is None or w_dq is None or view.is_const(a_dq.input[0]):
                continue
            quantized_output = bool(view.uses(node.output[0])) and not view.is_graph_output(node.output[0]) and all(
                u.op_type == "QuantizeLinear" for u in view.uses(node.output[0]))
            if node.op_type == "Conv":
                if not quantized_output:
                    continue  # ORT fuses DQ -> Conv only with a Q after it (QLinearConv)
                op, probe_op = "QLinearConv", "QLinearConv"
            elif node.op_type == "Gemm":
                if not quantized_output:
                    continue  # ... and DQ -> Gemm only into QGemm
                op, probe_op = "QGemm", "MatMulInteger"
            else:
                op, probe_op = ("QLinearMatMul", "MatMulInteger") if quantized_output else ("MatMulIntegerToFloat", "MatMulIntegerToFloat")
            a_type, w_type = types.dtype(a_dq.input[0]), types.dtype(w_dq.input[0])
            if x86 and a_type == np.int8:
                a_type = np.dtype(np.uint8)
            kernels.append(IntegerKernel(node_label(node), op, probe_op, _form_of(a_type, w_type),
                                         _weight_bits(view, w_dq.input[0], w_type), fused=True))
    return kernels


@dataclasses.dataclass(frozen=True)
class FormReport:
    """What :func:`verify_model` found.

    Attributes:
        recorded: The form the file records (None: none recorded).
        kernels: Its integer kernels.
        probe: This CPU's probe (None when nothing needed it).
    """

    recorded: Optional[RecordedForm]
    kernels: List[IntegerKernel]
    probe: Optional[ProbeResult]

    @property
    def form(self) -> Optional[str]:
        """The recorded form, else the one the graph's integer kernels show (None: float only)."""
        if self.recorded is not None:
            return self.recorded.form
        forms = sorted({k.form for k in self.kernels})
        return "+".join(forms) if forms else None

    def describe(self) -> str:
        """One line for ``quantlab run`` / ``quantlab check``."""
        if self.recorded is None and not self.kernels:
            return "none (float kernels)"
        what = self.recorded.describe() if self.recorded is not None else f"{self.form} (read from the graph; no quantlab record)"
        kinds = sorted({k.kind for k in self.kernels})
        counted = f"; {len(self.kernels)} integer layer(s): {', '.join(kinds)}" if kinds else "; no integer kernels"
        here = "; exact on this CPU" if self.probe is not None else ""
        return what + counted + here

    def to_dict(self) -> dict:
        return {
            "form": self.form,
            "recorded": dataclasses.asdict(self.recorded) if self.recorded else None,
            "kernels": sorted({k.kind for k in self.kernels}),
            "exact_here": True if self.probe is not None else None,
        }


def verify_model(model: onnx.ModelProto, source: str = "<model>", *, qdq_fusion: bool = True,
                 probe_result: Optional[ProbeResult] = None) -> FormReport:
    """Checks that every UINT8-activation integer kernel of ``model`` is exact on this CPU.

    Args:
        model: The ONNX model.
        source: Its file name, for messages.
        qdq_fusion: Whether the session fuses Q/DQ patterns (see :func:`integer_kernels`).
        probe_result: This CPU's probe (default: :func:`~quantlab.runtimes.onnxruntime.forms.cached_probe`).

    Raises:
        OrtFormError: a kernel kind is not exact here (one line: the kind, the
            first layer, the probe's error, the CPU, and the fix), or the metadata is bad.
    """
    recorded = recorded_form(model, source)
    kernels = integer_kernels(model, qdq_fusion=qdq_fusion)
    checked = [k for k in kernels if k.form in ("u8s8", "u8u8", "s8s8")]
    if not checked:
        return FormReport(recorded, kernels, None)
    result = probe_result if probe_result is not None else ort_forms.cached_probe()
    for kernel in checked:
        bad = dict(result.inexact_ops(kernel.form, kernel.weight_bits))
        if kernel.probe_op not in bad:
            continue
        same = [k for k in checked if k.kind == kernel.kind]
        error = bad[kernel.probe_op].max_abs_error
        off = f"a worst-case probe was off by {error}" if error >= 0 else "ONNX Runtime could not run its probe"
        if kernel.fused:
            off += f"; ONNX Runtime fuses it from the file's Q/DQ around {kernel.node}"
        fix = choose_form(result, 8)
        origin = f"the file records form {recorded.describe()}" if recorded else "the file records no quantlab form"
        raise OrtFormError(
            f"{source}: {kernel.kind} is not exact on this CPU, {result.cpu.describe()} with onnxruntime "
            f"{result.onnxruntime} ({off}; {len(same)} layer(s) such as '{kernel.node}'; {origin}): refusing to "
            f"compute wrong INT8 results; re-export with `quantlab export --target ort-cpu --ort-int8 {fix}` "
            f"(or --ort-int8 auto on this machine)"
        )
    return FormReport(recorded, kernels, result)


__all__ = [
    "FormReport", "IntegerKernel", "METADATA_CHOSEN_ON", "METADATA_FORM", "METADATA_REQUESTED",
    "METADATA_WEIGHT_BITS", "RecordedForm", "form_metadata", "integer_kernels", "recorded_form", "verify_model",
]
