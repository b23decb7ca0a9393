"""Attaching quantizers to a model, in place, without patching torch.nn globally.

* Weights: a :class:`TensorQuantizer` registered as a ``torch.nn.utils.parametrize``
  parametrization of the weight, so every read of ``module.weight`` (from any
  ``forward``, including a subclass's own) sees the fake-quantized weight.
* Inputs: a forward pre-hook that passes the first input through
  ``module.input_quantizer``. The hook is a module-level function that looks the
  quantizer up on the module, so deep copies and pickles keep working.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from quantlab.config import QuantConfig
from quantlab.cuda_graphs import MIN_BATCHES, graphed_forward
from quantlab.errors import NothingToQuantizeError
from quantlab.registry import lookup_quantizable
from quantlab.statistics import flush_all
from quantlab.tensor_quantizer import QuantizerMode, TensorQuantizer

_HOOK_ATTR = "_quantlab_input_hook"


@dataclasses.dataclass(frozen=True)
class QuantizerRef:
    """One quantizer of a model: which module, which role."""

    module_name: str
    role: str  # "input" or "weight"
    module: nn.Module
    quantizer: TensorQuantizer

    @property
    def key(self) -> str:
        return f"{self.module_name}:{self.role}"


def _input_hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    quantizer = module.__dict__["_modules"].get("input_quantizer")
    if quantizer is None or quantizer.mode is QuantizerMode.OFF:
        return None
    if args:
        return (quantizer(args[0]),) + tuple(args[1:]), kwargs
    for key, value in kwargs.items():  # called as module(input=x)
        if isinstance(value, torch.Tensor):
            kwargs = dict(kwargs)
            kwargs[key] = quantizer(value)
            return args, kwargs
    return None


def _selected(name: str, config: QuantConfig) -> bool:
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in config.include):
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in config.exclude)


def weight_quantizer(module: nn.Module) -> Optional[TensorQuantizer]:
    """The weight quantizer of a quantized module, or None."""
    if not parametrize.is_parametrized(module):
        return None
    for plist in module.parametrizations.values():
        for p in plist:
            if isinstance(p, TensorQuantizer):
                return p
    return None


def iter_quantizers(model: nn.Module) -> Iterator[QuantizerRef]:
    """Yields every quantizer of ``model`` in module order (input before weight)."""
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) or isinstance(module, parametrize.ParametrizationList):
            continue
        inp = module.__dict__["_modules"].get("input_quantizer")
        if isinstance(inp, TensorQuantizer):
            yield QuantizerRef(name, "input", module, inp)
        wq = weight_quantizer(module)
        if wq is not None:
            yield QuantizerRef(name, "weight", module, wq)


def is_quantized(model: nn.Module) -> bool:
    return next(iter_quantizers(model), None) is not None


def attach_quantizers(model: nn.Module, config: QuantConfig) -> List[str]:
    """Adds input and weight quantizers to every selected quantizable module.

    Returns:
        Names of the modules that were given quantizers.

    Raises:
        NothingToQuantizeError: if no module is both quantizable and selected.
    """
    attached: List[str] = []
    candidates = [(n, m) for n, m in model.named_modules() if lookup_quantizable(m) is not None]
    for name, module in candidates:
        if not _selected(name, config) or "input_quantizer" in module._modules:
            continue
        entry = lookup_quantizable(module)
        assert entry is not None
        weight = getattr(module, entry.weight_name, None)
        if not isinstance(weight, torch.Tensor):
            continue
        label = name or type(module).__name__
        wspec = config.weight
        channels = None
        if wspec.per_channel:
            axis = entry.weight_axis % weight.dim()
            wspec = dataclasses.replace(wspec, axis=axis)
            channels = weight.shape[axis]
        wq = TensorQuantizer(wspec, role="weight", name=label, channels=channels).to(weight.device)
        iq = TensorQuantizer(config.input, role="input", name=label, num_bins=config.num_bins).to(weight.device)
        module.add_module("input_quantizer", iq)
        handle = module.register_forward_pre_hook(_input_hook, with_kwargs=True)
        object.__setattr__(module, _HOOK_ATTR, handle)
        parametrize.register_parametrization(module, entry.weight_name, wq)
        attached.append(name)
    if not attached:
        seen = sorted({type(m).__name__ for _, m in model.named_modules()})
        why = (
            f"no module matches include={list(config.include)} exclude={list(config.exclude)}"
            if candidates
            else "it has no Linear, Conv, ConvTranspose or registered module"
        )
        raise NothingToQuantizeError(
            f"nothing to quantize in {type(model).__name__}: {why} (module types seen: {', '.join(seen[:20])}); "
            "register custom types with quantlab.register_quantizable"
        )
    return attached


def remove_quantizers(model: nn.Module) -> nn.Module:
    """Removes every quantizer, restoring plain floating-point modules in place."""
    for ref in list(iter_quantizers(model)):
        module = ref.module
        if ref.role == "weight":
            entry = lookup_quantizable(module)
            parametrize.remove_parametrizations(module, entry.weight_name if entry else "weight", leave_parametrized=False)
        else:
            handle = module.__dict__.pop(_HOOK_ATTR, None)
            if handle is not None:
                handle.remove()
            else:  # e.g. after a deep copy: drop our hook by identity
                for key, hook in list(module._forward_pre_hooks.items()):
                    if hook is _input_hook:
                        del module._forward_pre_hooks[key]
                        module._forward_pre_hooks_with_kwargs.pop(key, None)
            del module._modules["input_quantizer"]
    return model


def set_mode(model: nn.Module, mode: "QuantizerMode | str", *, role: Optional[str] = None, names: Optional[List[str]] = None) -> None:
    """Sets the mode of all (or the selected) quantizers."""
    for ref in iter_quantizers(model):
        if role is not None and ref.role != role:
            continue
        if names is not None and ref.module_name not in names:
            continue
        ref.quantizer.set_mode(mode)


@contextlib.contextmanager
def quantization_disabled(model: nn.Module, layers: Optional[Iterable[str]] = None) -> Iterator[nn.Module]:
    """Temporarily runs ``model`` in floating point: all quantizers off, or those of ``layers``."""
    wanted = None if layers is None else set(layers)
    saved = [(ref.quantizer, ref.quantizer.mode) for ref in iter_quantizers(model) if wanted is None or ref.module_name in wanted]
    try:
        for quantizer, _ in saved:
            quantizer.mode = QuantizerMode.OFF
        yield model
    finally:
        for quantizer, mode in saved:
            quantizer.mode = mode


def float_layers(model: nn.Module) -> List[str]:
    """Names of the quantized layers whose quantizers are all off (kept in floating point), sorted."""
    modes: Dict[str, List[QuantizerMode]] = {}
    for ref in iter_quantizers(model):
        modes.setdefault(ref.module_name, []).append(ref.quantizer.mode)
    return sorted(m for m, ms in modes.items() if all(x is QuantizerMode.OFF for x in ms))


def collect_statistics(model: nn.Module, forward_loop: Callable[[nn.Module], Any], cuda_graphs: bool = True) -> Dict[str, int]:
    """Runs ``forward_loop(model)`` once with every input quantizer collecting statistics.

    Weights and activations stay in floating point during the pass, as in
    TensorRT's calibration. Returns the number of batches each input quantizer saw.

    Args:
        model: A model with quantizers attached.
        forward_loop: Calls the model on the calibration batches.
        cuda_graphs: On CUDA, replay repeated calls of ``model`` (same input
            shapes) as CUDA graphs, statistics included (quantlab.cuda_graphs;
            a call that cannot be captured runs eagerly). No effect on the CPU,
            nor when ``forward_loop.expected_batches`` (set by
            :func:`quantlab.batching.forward_loop` for sized data) is below
            ``quantlab.cuda_graphs.MIN_BATCHES``: a capture costs more than so
            few replays save.
    """
    expected = getattr(forward_loop, "expected_batches", None)
    if expected is not None and expected < MIN_BATCHES:
        cuda_graphs = False
    refs = list(iter_quantizers(model))
    saved = {id(r.quantizer): r.quantizer.mode for r in refs}
    for ref in refs:
        if ref.role == "input":
            ref.quantizer.mode = QuantizerMode.OFF  # restart statistics
            ref.quantizer.set_mode(QuantizerMode.COLLECT)
        else:
            ref.quantizer.mode = QuantizerMode.OFF
    # Every module in eval mode for the pass (model.eval(), so overrides of train() run), then each
    # put back as it was (model.train(flag) would also flip submodules the caller set differently).
    training = [m for m in model.modules() if m.training]
    if training:
        model.eval()
    try:
        with torch.no_grad(), graphed_forward(model, enabled=cuda_graphs):
            forward_loop(model)
    finally:
        for m in training:
            m.training = True
        for ref in refs:
            ref.quantizer.mode = saved[id(ref.quantizer)] if ref.role == "weight" else QuantizerMode.OFF
    # On the GPU the statistics stay on the device during the pass; fold them in now (one
    # read-back per tensor), which is also where a NaN/Inf seen on the way is reported.
    flush_all([ref.quantizer.collector for ref in refs if ref.role == "input" and ref.quantizer.collector is not None])
    return {ref.module_name: ref.quantizer.collector.num_batches for ref in refs if ref.role == "input" and ref.quantizer.collector}
