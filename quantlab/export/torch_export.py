"""Running PyTorch's ONNX exporters on a (quantized) model.

Two exporters exist in the installed torch and both were checked:

* ``"torchscript"`` (``torch.onnx.export(dynamo=False)``, the default here): about
  ten times faster than dynamo on small models. It turns
  ``fake_quantize_per_*_affine`` into QuantizeLinear/DequantizeLinear but rejects
  the narrow range (-127, 127), so weights are exported with (-128, 127); the
  integer weights written to the file are recomputed with the narrow range by
  :func:`quantlab.export.fold.quantize_weight`, so the values are identical.
* ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, needs ``onnxscript``): the
  ``fake_quantize`` ops have no meta kernel for ``torch.export``, so quantizers
  are expressed with ``torch.ops.quantized_decomposed.quantize_*`` /
  ``dequantize_*`` which onnxscript maps to Q/DQ (the narrow weight range
  becomes a Clip that the weight folding removes).

Either way each quantizer's scale is computed from its ``amax`` buffer before
tracing, so the graph holds constant scales (no Abs/ReduceMax in front of a Q).
After export, :mod:`quantlab.export.fold` folds the rest.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import onnx
import torch
from torch import nn

from quantlab.algorithms.input_shift import shifts_in_bias
from quantlab.attach import iter_quantizers
from quantlab.batching import main_tensor
from quantlab.export.errors import ExportError
from quantlab.functional import scale_from_amax
from quantlab.tensor_quantizer import QuantizerMode, Role, TensorQuantizer

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"
DEFAULT_OPSET = 17


def _input_forward(q: TensorQuantizer, exporter: str) -> Callable[[torch.Tensor], torch.Tensor]:
    scale = float(scale_from_amax(q.amax, q.spec))
    qmin, qmax = q.spec.quant_min, q.spec.quant_max

    def forward(x: torch.Tensor) -> torch.Tensor:
        if q.mode is not QuantizerMode.QUANTIZE:
            return x
        if exporter == "dynamo":
            ops = torch.ops.quantized_decomposed
            xq = ops.quantize_per_tensor(x, scale, 0, qmin, qmax, torch.int8)
            return ops.dequantize_per_tensor(xq, scale, 0, qmin, qmax, torch.int8)
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)

    return forward


def _weight_forward(q: TensorQuantizer, exporter: str) -> Callable[[torch.Tensor], torch.Tensor]:
    scale = scale_from_amax(q.amax, q.spec).detach().cpu().clone()
    per_channel = q.spec.axis is not None

    def forward(w: torch.Tensor) -> torch.Tensor:
        if q.mode is not QuantizerMode.QUANTIZE:
            return w
        s = scale.to(w.device)
        if exporter == "dynamo":
            ops = torch.ops.quantized_decomposed
            if per_channel:
                zp = torch.zeros(s.numel(), dtype=torch.int64, device=w.device)
                wq = ops.quantize_per_channel(w, s, zp, q.spec.axis, q.spec.quant_min, q.spec.quant_max, torch.int8)
                return ops.dequantize_per_channel(wq, s, zp, q.spec.axis, q.spec.quant_min, q.spec.quant_max, torch.int8)
            value = float(s)
            wq = ops.quantize_per_tensor(w, value, 0, q.spec.quant_min, q.spec.quant_max, torch.int8)
            return ops.dequantize_per_tensor(wq, value, 0, q.spec.quant_min, q.spec.quant_max, torch.int8)
        # TorchScript rejects (-127, 127); the folded int8 weights re-apply the narrow range.
        if per_channel:
            zp = torch.zeros(s.numel(), dtype=torch.int32, device=w.device)
            return torch.fake_quantize_per_channel_affine(w, s, zp, q.spec.axis, -128, 127)
        return torch.fake_quantize_per_tensor_affine(w, float(s), 0, -128, 127)

    return forward


@contextlib.contextmanager
def export_forwards(model: nn.Module, exporter: str) -> Iterator[None]:
    """Temporarily gives every quantizer a forward the exporter turns into Q/DQ with constant scales.

    The instance attribute ``forward`` shadows :meth:`TensorQuantizer.forward`;
    it is removed on exit, so the model is unchanged afterwards.
    """
    if exporter == "dynamo":
        import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
    patched: List[TensorQuantizer] = []
    try:
        for ref in iter_quantizers(model):
            q = ref.quantizer
            if q.mode is QuantizerMode.QUANTIZE:
                q.forward = (_input_forward if ref.role is Role.INPUT else _weight_forward)(q, exporter)
            else:
                q.forward = _passthrough
            patched.append(q)
        yield
    finally:
        for q in patched:
            q.__dict__.pop("forward", None)


def _passthrough(x: torch.Tensor) -> torch.Tensor:
    return x


def as_args(example_inputs: Any) -> Tuple[Any, ...]:
    """Normalizes example inputs to the positional-args tuple the exporters take."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, dict):
        return ((), example_inputs)  # kwargs-only call
    raise ExportError(f"example inputs must be a tensor, a tuple/list of tensors or a dict, got {type(example_inputs).__name__}")


def _keywords(args: Tuple[Any, ...]) -> Optional[Dict[str, Any]]:
    """The keyword dict of a keyword-only call as :func:`as_args` writes it (``((), {...})``), else None."""
    return args[1] if len(args) == 2 and args[0] == () and isinstance(args[1], dict) else None


def _flat_tensors(args: Tuple[Any, ...]) -> List[torch.Tensor]:
    keywords = _keywords(args)
    return [v for v in (args if keywords is None else keywords.values()) if isinstance(v, torch.Tensor)]


def run_exporter(
    model: nn.Module,
    example_inputs: Any,
    *,
    exporter: str = DEFAULT_EXPORTER,
    opset: int = DEFAULT_OPSET,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_batch: bool = True,
) -> onnx.ModelProto:
    """Exports ``model`` (as it computes now) to an in-memory ONNX model.

    Args:
        model: The model, in eval mode; quantizers must already be in export form
            (:func:`export_forwards`) for a Q/DQ graph.
        example_inputs: A tensor, tuple of tensors or dict of keyword tensors.
        exporter: ``"torchscript"`` or ``"dynamo"``.
        opset: Default-domain opset (>= 13 for per-channel Q/DQ).
        input_names: Names of the graph inputs (default ``input``, ``input_1`` ...).
        output_names: Names of the graph outputs (default ``output``, ``output_1`` ...).
        dynamic_batch: Make dimension 0 of every input and output symbolic ("batch").

    Raises:
        ExportError: naming the exporter and its message.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    args = as_args(example_inputs)
    tensors = _flat_tensors(args)
    if not tensors:
        raise ExportError("example inputs hold no tensor")
    keywords = _keywords(args)  # a keyword-only call: the exporters take the dict as ``kwargs``
    if not input_names and keywords is not None:
        input_names = [k for k, v in keywords.items() if isinstance(v, torch.Tensor)]  # keyword inputs keep their names
    input_names = list(input_names or (["input"] if len(tensors) == 1 else [f"input_{i}" for i in range(len(tensors))]))
    if len(input_names) != len(tensors):
        raise ExportError(f"{len(input_names)} input names given for {len(tensors)} input tensors")
    model = model.eval()
    positional = args if keywords is None else ()
    adapted = keywords is not None and exporter == "torchscript"
    if adapted:
        model, positional, keywords = _KeywordCall(model, list(keywords)), tuple(keywords.values()), None
    if not output_names:  # counted on the model that is exported (the adapter returns one tensor)
        count = _count_outputs(model, positional, keywords)
        output_names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    output_names = list(output_names)
    with tempfile.TemporaryDirectory(prefix="quantlab_export_") as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        try:
            if exporter == "torchscript":
                dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
                torch.onnx.export(
                    model, positional, str(path), kwargs=keywords, dynamo=False, opset_version=opset,
                    input_names=input_names, output_names=output_names,
                    dynamic_axes=dynamic_axes, do_constant_folding=True,
                )
            else:
                dynamic_shapes = None
                if dynamic_batch:
                    batch = torch.export.Dim("batch", min=1)
                    dynamic_shapes = (tuple({0: batch} for _ in tensors) if keywords is None
                                      else {k: {0: batch} for k, v in keywords.items() if isinstance(v, torch.Tensor)})
                with contextlib.redirect_stdout(io.StringIO()), _quiet_logger("torch.onnx._internal.exporter._registration"):
                    program = torch.onnx.export(
                        model, positional, None, kwargs=keywords, dynamo=True, opset_version=max(opset, 18),
                        input_names=input_names, output_names=output_names,
                        dynamic_shapes=dynamic_shapes, verbose=False,
                    )
                program.save(str(path))
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - surface any exporter failure with its message
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"torch.onnx.export ({exporter}) failed for {type(model).__name__}: {first[:500]}") from exc
        exported = onnx.load(str(path))
    if adapted:
        _strip_adapter_scope(exported)
    return exported


def _strip_adapter_scope(proto: onnx.ModelProto) -> None:
    """Removes :class:`_KeywordCall`'s ``model`` level from node, tensor and initializer names.

    The graph then names everything as the unwrapped model would, which is what
    the module-to-tensor mapping (and a user reading the graph) expects.
    """
    def strip(name: str) -> str:
        if name.startswith("/model/"):
            return name[len("/model"):]
        return name[len("model."):] if name.startswith("model.") else name

    graph = proto.graph
    for node in graph.node:
        node.name = strip(node.name)
        node.input[:] = [strip(n) for n in node.input]
        node.output[:] = [strip(n) for n in node.output]
    for collection in (graph.initializer, graph.input, graph.output, graph.value_info):
        for item in collection:
            item.name = strip(item.name)


class _KeywordCall(nn.Module):
    """``model(**dict(zip(keys, tensors)))`` behind a positional forward, for the TorchScript exporter.

    Given a kwargs dict, that exporter binds it to the whole forward signature and
    turns defaulted parameters into graph inputs (Hugging Face LMs gained a
    ``logits_to_keep`` input that cut the logits to one position), and it cannot
    return cache objects. Behind this adapter the graph takes exactly the given
    tensors and returns the model's main output (logits or last hidden state).
    """

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = tuple(keys)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        output = self.model(**dict(zip(self.keys, tensors)))
        tensor = main_tensor(output)
        if tensor is None:
            raise ExportError(f"cannot find an output tensor to export in the model's output ({type(output).__name__})")
        return tensor


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silences one logger (dynamo's registry warns that torchvision ops are absent)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _count_outputs(model: nn.Module, positional: Tuple[Any, ...], keywords: Optional[Dict[str, Any]]) -> int:
    """Number of tensors the model returns for the call (tuples, lists, dicts flattened)."""
    with torch.no_grad():
        out = model(*positional, **(keywords or {}))
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return max(1, sum(isinstance(t, torch.Tensor) for t in flat))


def example_batch(example_inputs: Any, batch: int = 2) -> Any:
    """Repeats/trims dimension 0 of every example tensor to ``batch``.

    A batch of 1 lets ``torch.export`` specialize the batch dimension, so the
    exporters are traced with 2 samples.
    """
    def fix(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        if t.shape[0] >= batch:
            return t[:batch]
        reps = [-(-batch // t.shape[0])] + [1] * (t.dim() - 1)
        return t.repeat(*reps)[:batch]

    if isinstance(example_inputs, dict):
        return {k: fix(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(fix(v) for v in example_inputs)
    return fix(example_inputs)


__all__ = ["DEFAULT_EXPORTER", "DEFAULT_OPSET", "EXPORTERS", "example_batch", "export_forwards", "run_exporter"]


def export_in_eval(
    model: nn.Module,
    example_inputs: Any,
    *,
    exporter: str,
    opset: int,
    input_names: Optional[Sequence[str]],
    output_names: Optional[Sequence[str]],
    dynamic_batch: bool,
    float_only: bool = False,
) -> onnx.ModelProto:
    """Exports ``model`` in eval mode with constant-scale quantizer forwards.

    The training flag is restored afterwards. With ``float_only`` every quantizer
    is off, giving the FP32 graph of a quantized model.
    """
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            if float_only:
                from quantlab.attach import quantization_disabled

                stack.enter_context(quantization_disabled(model))
            # input-shift's c * sum(W_int8) as one constant bias (computed before the Q/DQ forwards go in).
            stack.enter_context(shifts_in_bias(model))
            stack.enter_context(export_forwards(model, exporter))
            return run_exporter(
                model, example_batch(example_inputs), exporter=exporter, opset=opset,
                input_names=input_names, output_names=output_names, dynamic_batch=dynamic_batch,
            )
    finally:
        model.train(was_training)
