"""Exported programs (``.pt2``) and TorchScript files as quantizable ``nn.Module`` s.

quantlab quantizes modules: it hangs a weight quantizer on ``Conv``/``Linear``
modules and an input quantizer in front of them. A model saved with
``torch.export.save`` or ``torch.jit.save`` has no such modules any more: its
graph calls ``aten.conv2d`` / ``aten.linear`` on bare parameters. This module
turns such a graph back into one quantlab can quantize:

* ``.pt2``: ``torch.export.load(path).module()`` gives an ``fx.GraphModule``;
  every ``aten.conv*`` / ``aten.linear`` call whose weight is a parameter becomes
  a call of a real ``nn.Conv*`` / ``nn.Linear`` module holding the same tensors,
  placed where the original module was (``stem.0.weight`` -> module ``stem.0``),
  so a scales file calibrated on the eager model fits the exported one.
* TorchScript: converted to an exported program first (``torch._export.converter``,
  which needs one example batch for shape propagation), then as above.

Both are captured in inference mode (BatchNorm uses its running statistics):
calibration, comparison and export work; QAT needs the trainable Python model.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import fx, nn

from quantlab.errors import QuantlabError


class GraphModelError(QuantlabError):
    """An exported program or TorchScript file cannot be turned into a quantizable model."""


class ModelInputError(QuantlabError, ValueError):
    """A batch does not fit the input shapes an exported program was captured for."""


#: Marks a module rebuilt from a captured graph (checked by :func:`is_captured_graph`).
CAPTURED_ATTR = "quantlab_captured_from"

_aten = torch.ops.aten


def _conv_args(node: fx.Node, nd: int) -> Optional[Dict[str, Any]]:
    """Keyword form of an ``aten.conv{nd}d`` call (default or padding overload)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": [1] * nd, "padding": [0] * nd, "dilation": [1] * nd, "groups": 1}
    return _bind(node, names, defaults)


def _bind(node: fx.Node, names: Tuple[str, ...], defaults: Dict[str, Any]) -> Dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _conv_module(bound: Dict[str, Any], weight: torch.Tensor, nd: int, transposed: bool = False) -> nn.Module:
    groups = int(bound["groups"])
    kernel = tuple(weight.shape[2:])
    if transposed:
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]
        in_ch, out_ch = weight.shape[0], weight.shape[1] * groups
        module = cls(in_ch, out_ch, kernel, stride=bound["stride"], padding=bound["padding"],
                     output_padding=bound.get("output_padding") or 0, groups=groups, dilation=bound["dilation"],
                     bias=bound["bias"] is not None, device="meta")
    else:
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        out_ch, in_ch = weight.shape[0], weight.shape[1] * groups
        module = cls(in_ch, out_ch, kernel, stride=bound["stride"], padding=bound["padding"],
                     dilation=bound["dilation"], groups=groups, bias=bound["bias"] is not None, device="meta")
    return module


def _weighted_op(node: fx.Node) -> Optional[Tuple[Dict[str, Any], Callable[[Dict[str, Any], torch.Tensor], nn.Module]]]:
    """``(arguments, module factory)`` for the aten calls quantlab turns into modules."""
    if node.op != "call_function":
        return None
    target = node.target
    for nd, packet in ((1, _aten.conv1d), (2, _aten.conv2d), (3, _aten.conv3d)):
        if target in (packet.default, getattr(packet, "padding", None)):
            return _conv_args(node, nd), (lambda b, w, nd=nd: _conv_module(b, w, nd))
    if target is _aten.convolution.default:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
        bound = _bind(node, names, {})
        return bound, (lambda b, w: _conv_module(b, w, w.dim() - 2, transposed=bool(b["transposed"])))
    for nd, packet in ((1, _aten.conv_transpose1d), (2, _aten.conv_transpose2d), (3, _aten.conv_transpose3d)):
        if target is getattr(packet, "input", None):
            names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
            defaults = {"bias": None, "stride": [1] * nd, "padding": [0] * nd, "output_padding": [0] * nd,
                        "groups": 1, "dilation": [1] * nd}
            return _bind(node, names, defaults), (lambda b, w, nd=nd: _conv_module(b, w, nd, transposed=True))
    if target is _aten.linear.default:
        bound = _bind(node, ("input", "weight", "bias"), {"bias": None})
        return bound, (lambda b, w: nn.Linear(w.shape[1], w.shape[0], bias=b["bias"] is not None, device="meta"))
    return None


def _attr_target(gm: fx.GraphModule, arg: Any) -> Optional[str]:
    return arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _as_parameter(value: torch.Tensor) -> nn.Parameter:
    return value if isinstance(value, nn.Parameter) else nn.Parameter(value.detach(), requires_grad=False)


def _place(gm: fx.GraphModule, weight_target: str, bias_target: Optional[str], module: nn.Module) -> str:
    """Installs ``module`` where its weight lived; returns its qualified name."""
    holder_name, _, attr = weight_target.rpartition(".")
    holder = gm.get_submodule(holder_name) if holder_name else gm
    bias_holder = bias_target.rpartition(".")[0] if bias_target else holder_name
    own = {n for n, _ in holder.named_parameters(recurse=False)} | {n for n, _ in holder.named_buffers(recurse=False)}
    expected = {attr} | ({bias_target.rpartition(".")[2]} if bias_target else set())
    if holder_name and attr == "weight" and bias_holder == holder_name and own <= expected and not list(holder.children()) \
            and type(holder) is nn.Module:
        parent_name, _, child = holder_name.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        setattr(parent, child, module)
        return holder_name
    name = f"{holder_name + '.' if holder_name else ''}{attr}_op"
    index = 0
    while _exists(gm, name):
        index += 1
        name = f"{holder_name + '.' if holder_name else ''}{attr}_op{index}"
    parent = gm.get_submodule(name.rpartition(".")[0]) if "." in name else gm
    parent.add_module(name.rpartition(".")[2], module)
    return name


def _exists(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True


def modules_from_graph(gm: fx.GraphModule) -> int:
    """Replaces ``aten`` conv/linear calls on parameters by module calls, in place.

    Returns:
        How many calls became modules.
    """
    graph = gm.graph
    made: Dict[str, str] = {}  # weight target -> module name (a weight used twice: one module)
    count = 0
    for node in list(graph.nodes):
        found = _weighted_op(node)
        if found is None:
            continue
        bound, factory = found
        weight_target = _attr_target(gm, bound.get("weight"))
        bias_arg = bound.get("bias")
        bias_target = _attr_target(gm, bias_arg)
        if weight_target is None or (bias_arg is not None and bias_target is None):
            continue  # a computed weight or bias: leave the call as it is
        name = made.get(weight_target)
        if name is None:
            weight = gm.get_parameter(weight_target) if _is_param(gm, weight_target) else gm.get_buffer(weight_target)
            module = factory(bound, weight)
            module.weight = _as_parameter(weight)
            if bias_target is not None:
                bias = gm.get_parameter(bias_target) if _is_param(gm, bias_target) else gm.get_buffer(bias_target)
                module.bias = _as_parameter(bias)
            name = made[weight_target] = _place(gm, weight_target, bias_target, module)
        with graph.inserting_before(node):
            call = graph.call_module(name, (bound["input"],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        count += 1
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return count


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    holder_name, _, attr = target.rpartition(".")
    holder = gm.get_submodule(holder_name) if holder_name else gm
    return attr in holder._parameters


class _ReadableGuards(nn.Module):
    """The exported program's input guards, failing with the shapes instead of an AssertionError."""

    def __init__(self, guards: nn.Module, source: str, shapes: str) -> None:
        super().__init__()
        self.guards = guards
        self.source = source
        self.shapes = shapes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.guards(*args, **kwargs)
        except AssertionError as exc:
            got = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            raise ModelInputError(
                f"{self.source}: a batch of shape {got} does not fit the exported program, captured for {self.shapes} "
                f"({str(exc).strip()[:160]}); export it with a dynamic batch "
                "(torch.export.export(..., dynamic_shapes=...)) or feed batches of that shape"
            ) from None


def _readable_input_checks(gm: fx.GraphModule, source: str, shapes: str, *, keep: bool) -> None:
    """The input-constraint pre-hook ``module()`` adds: dropped (TorchScript) or made to fail in words.

    It also reads symbolic sizes, which ``torch.jit.trace`` (the ONNX exporter) cannot: it is skipped
    while tracing, where the example batch is the one the export was asked for.
    """
    for hook_id, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") != "_check_input_constraints_pre_hook":
            continue
        if not keep:
            del gm._forward_pre_hooks[hook_id]
            gm._forward_pre_hooks_with_kwargs.pop(hook_id, None)
            continue

        def readable(module, args, kwargs=None, _hook=hook):
            if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
                return None
            try:
                return _hook(module, args, kwargs) if kwargs is not None else _hook(module, args)
            except (AssertionError, RuntimeError, ValueError) as exc:
                got = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
                raise ModelInputError(
                    f"{source}: inputs of shape {got} do not fit the exported program, captured for {shapes} "
                    f"({' '.join(str(exc).split())[:160]})"
                ) from None

        readable.__name__ = "_quantlab_readable_input_check"
        gm._forward_pre_hooks[hook_id] = readable


def _input_shapes(program: Any) -> str:
    shapes = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in _user_inputs(program):
            value = node.meta.get("val")
            shapes.append(str(tuple(value.shape)) if hasattr(value, "shape") else "?")
    return ", ".join(shapes) or "?"


def _user_inputs(program: Any) -> set:
    from torch.export.graph_signature import InputKind

    return {s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}


def _finish(program: Any, source: str, *, keep_guards: bool) -> nn.Module:
    gm = program.module()
    # module() forbids train()/eval() (the graph's mode is fixed at capture); quantlab toggles
    # modes on every model, which here only flips flags: give the instance nn.Module's methods back.
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    _readable_input_checks(gm, source, _input_shapes(program), keep=keep_guards)
    guards = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]
    if keep_guards:
        if guards:
            gm._guards_fn = _ReadableGuards(gm._guards_fn, source, _input_shapes(program))
    else:
        for node in guards:
            gm.graph.erase_node(node)
        if hasattr(gm, "_guards_fn"):
            del gm._guards_fn
        gm.recompile()
    converted = modules_from_graph(gm)
    if converted == 0:
        raise GraphModelError(f"{source}: no convolution or linear layer with constant weights in the graph: nothing quantlab can quantize")
    setattr(gm, CAPTURED_ATTR, source)
    return gm


def load_exported_program(path: Union[str, Path]) -> nn.Module:
    """A ``.pt2`` file (``torch.export.save``) as a quantizable module.

    The program's input guards stay: a batch of another shape than it was
    captured for raises :class:`ModelInputError` naming both shapes.
    """
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign file: name it
        raise GraphModelError(f"{path}: not a loadable exported program ({type(exc).__name__}: {str(exc)[:200]})") from None
    return _finish(program, str(path), keep_guards=True)


def load_torchscript(path: Union[str, Path], example_inputs: Any) -> nn.Module:
    """A TorchScript file (``torch.jit.save``) as a quantizable module.

    Args:
        path: The file.
        example_inputs: One batch of the model's inputs (a tensor or a tuple):
            the converter propagates shapes through the TorchScript graph with it.
            The graph stays shape-generic (any batch size).
    """
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise GraphModelError(
            f"{path}: not a TorchScript file ({type(exc).__name__}). A plain state_dict needs a factory: "
            "--model module:factory --weights FILE"
        ) from None
    if example_inputs is None:
        raise GraphModelError(
            f"{path}: a TorchScript model is converted to an exported program for quantization, which needs one example "
            "batch: the CLI takes it from --data (export: --data or --input-shape); from Python pass example_inputs="
        )
    from torch._export.converter import TS2EPConverter

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = TS2EPConverter(scripted, args).convert()
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        raise GraphModelError(
            f"{path}: this TorchScript model could not be converted for quantization ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); pass the Python model instead "
            "(--model file.py:factory --weights state_dict.pt)"
        ) from None
    # TorchScript is shape-generic; the converter's retrace only adds guards (batch >= 2) it does not need.
    return _finish(program, str(path), keep_guards=False)


def is_captured_graph(model: nn.Module) -> bool:
    """Whether ``model`` was rebuilt from an exported program or TorchScript (inference mode only)."""
    return hasattr(model, CAPTURED_ATTR)


__all__ = [
    "GraphModelError",
    "ModelInputError",
    "is_captured_graph",
    "load_exported_program",
    "load_torchscript",
    "modules_from_graph",
]
