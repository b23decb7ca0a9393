"""Attaching quantizers to a model, in place, without patching torch.nn globally.

* Weights: a :class:`TensorQuantizer` registered as a ``torch.nn.utils.parametrize``
  parametrization of the weight, so every read of ``module.weight`` (from any
  ``forward``, including a subclass's own) sees the fake-quantized weight.
* Inputs: a forward pre-hook that passes the first input through
  ``module.input_quantizer``. The hook is a module-level function that looks the
  quantizer up on the module, so deep copies and pickles keep working.

This module is the one place that knows where quantizers hang on a module
(:func:`iter_quantizers`, :func:`weight_quantizer`, :func:`original_weight`,
:func:`replace_quantizer`), the one that sets and removes the marker of a
quantized model (its config, :func:`get_config`), and the one that removes weight
parametrizations (:func:`remove_parametrization`: safe on deep copies).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import fnmatch
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.nn.utils import parametrize

from quantlab.config import QuantConfig
from quantlab.errors import NothingToQuantizeError
from quantlab.registry import lookup_quantizable
from quantlab.tensor_quantizer import QuantizerMode, Role, TensorQuantizer

_HOOK_ATTR = "_quantlab_input_hook"
# The marker of a quantized model: the config it was quantized with, in the model's __dict__
# (not a submodule or buffer, so state_dicts and deep copies of the FP32 model stay unchanged).
_CONFIG_ATTR = "_quantlab_config"


@dataclasses.dataclass(frozen=True)
class QuantizerRef:
    """One quantizer of a model: which module, which role."""

    module_name: str
    role: Role
    module: nn.Module
    quantizer: TensorQuantizer

    @functools.cached_property
    def key(self) -> str:
        return f"{self.module_name}:{self.role.value}"


def _input_hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    quantizer = module.__dict__["_modules"].get("input_quantizer")
    if quantizer is None:
        return None
    mode = quantizer._mode  # the attribute, not the property: this runs per layer per batch
    if mode is QuantizerMode.OFF:
        return None
    if args:
        if mode is QuantizerMode.COLLECT and _calls_plainly(quantizer):
            # What the quantizer's forward does in this mode (TensorQuantizer's contract), without a
            # module call: a statistics pass makes this call per quantized layer per batch.
            quantizer.observe(args[0])
            return None
        return (quantizer(args[0]),) + tuple(args[1:]), kwargs
    for key, value in kwargs.items():  # called as module(input=x)
        if isinstance(value, torch.Tensor):
            kwargs = dict(kwargs)
            kwargs[key] = quantizer(value)
            return args, kwargs
    return None


def _calls_plainly(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its class's forward alone: no hooks of its own nor global ones,
    no ``forward`` set on the instance (a wrapper, e.g. accelerate's hooks)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module_globals._global_forward_hooks
                or _module_globals._global_forward_pre_hooks or _module_globals._global_backward_hooks
                or _module_globals._global_backward_pre_hooks or "forward" in module.__dict__)


def is_input_hook(hook: Any) -> bool:
    """Whether a forward pre-hook is quantlab's input hook."""
    return hook is _input_hook


def _selected(name: str, config: QuantConfig) -> bool:
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in config.include):
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in config.exclude)


def weight_quantizer(module: nn.Module) -> Optional[TensorQuantizer]:
    """The weight quantizer of a quantized module, or None."""
    # The registered submodule itself: getattr on a module without it raises inside nn.Module
    # (parametrize.is_parametrized's way), which made listing a model's quantizers ~5x slower.
    parametrizations = module.__dict__["_modules"].get("parametrizations")
    if not isinstance(parametrizations, nn.ModuleDict):
        return None
    for plist in parametrizations.values():
        for p in plist:
            if isinstance(p, TensorQuantizer):
                return p
    return None


def weight_name(module: nn.Module) -> str:
    """The name of the parametrized (quantized) weight of a quantized module."""
    return next(iter(module.parametrizations.keys()))


def original_weight(module: nn.Module) -> torch.Tensor:
    """The floating-point weight under a quantized module's weight quantizer (a Parameter)."""
    return module.parametrizations[weight_name(module)].original


def replace_quantizer(module: nn.Module, role: "Role | str", new: TensorQuantizer) -> None:
    """Puts ``new`` in place of ``module``'s input or weight quantizer."""
    if Role(role) is Role.INPUT:
        module._modules["input_quantizer"] = new
        return
    for plist in module.parametrizations.values():
        for index, p in enumerate(plist):
            if isinstance(p, TensorQuantizer):
                plist[index] = new
                return
    raise KeyError("module has no weight quantizer to replace")


def iter_quantizers(model: nn.Module) -> Iterator[QuantizerRef]:
    """Yields every quantizer of ``model`` in module order (input before weight)."""
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) or isinstance(module, parametrize.ParametrizationList):
            continue
        inp = module.__dict__["_modules"].get("input_quantizer")
        if isinstance(inp, TensorQuantizer):
            yield QuantizerRef(name, Role.INPUT, module, inp)
        wq = weight_quantizer(module)
        if wq is not None:
            yield QuantizerRef(name, Role.WEIGHT, module, wq)


def is_quantized(model: nn.Module) -> bool:
    return next(iter_quantizers(model), None) is not None


def get_config(model: nn.Module) -> Optional[QuantConfig]:
    """The config ``model`` was quantized with, if quantlab quantized it."""
    return model.__dict__.get(_CONFIG_ATTR)


def attach_quantizers(model: nn.Module, config: QuantConfig) -> List[str]:
    """Adds input and weight quantizers to every selected quantizable module and marks
    ``model`` as quantized with ``config``.

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
        wq = TensorQuantizer(wspec, role=Role.WEIGHT, name=label, channels=channels).to(weight.device)
        iq = TensorQuantizer(config.input, role=Role.INPUT, name=label, num_bins=config.num_bins).to(weight.device)
        module.add_module("input_quantizer", iq)
        handle = module.register_forward_pre_hook(_input_hook, with_kwargs=True)
        object.__setattr__(module, _HOOK_ATTR, handle)
        parametrize.register_parametrization(module, entry.weight_name, wq)
        # The new modules take the layer's mode (they start in training mode): a model in eval mode
        # stays all eval, so a statistics pass has no flags to flip and put back.
        for added in (iq, module.parametrizations):
            added.train(module.training)
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
    model.__dict__[_CONFIG_ATTR] = config
    return attached


def _own_class(module: nn.Module) -> None:
    """Gives a parametrized module a class of its own (a sibling of its class, same attributes).

    torch.nn.utils.parametrize makes one ``Parametrized<Type>`` class per module, and
    ``copy.deepcopy`` keeps it: the original and its copies share that class, and the
    property that computes the parametrized weight lives on it. Removing the last
    parametrization of a tensor deletes that property from the class, so removing it
    from a copy would break the original (and every other copy): ``module.weight``
    would no longer exist there. On a class of its own the removal stays local.
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def remove_parametrization(module: nn.Module, tensor_name: str, parametrization: nn.Module) -> None:
    """Removes one parametrization of ``module.<tensor_name>``; every other module is left as it is.

    The stored tensor (``parametrizations[tensor_name].original``) is kept as it is:
    the other parametrizations of the tensor stay in their order on top of it, and when
    ``parametrization`` was the last one the tensor becomes a plain parameter again
    (torch's ``leave_parametrized=False``), on a class of the module's own, so deep copies
    of the module (or of the model) keep their parametrizations (see :func:`_own_class`).
    The one place quantlab removes parametrizations: weight quantizers
    (:func:`remove_quantizers`) and 2:4 sparsity masks (:mod:`quantlab.sparsity.mask`).

    Raises:
        KeyError: ``parametrization`` is not one of ``module.<tensor_name>``'s.
    """
    plist = module.parametrizations[tensor_name] if parametrize.is_parametrized(module, tensor_name) else []
    index = next((i for i, p in enumerate(plist) if p is parametrization), None)
    if index is None:
        raise KeyError(f"{type(parametrization).__name__} is not a parametrization of {type(module).__name__}.{tensor_name}")
    if len(plist) > 1:
        del plist[index]
        return
    _own_class(module)
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)


def remove_quantizers(model: nn.Module) -> nn.Module:
    """Removes every quantizer and the marker, restoring floating-point modules in place.

    Other parametrizations of a weight (a 2:4 sparsity mask) stay. Safe on a deep copy:
    the original keeps its quantizers and works as before (:func:`remove_parametrization`).
    """
    model.__dict__.pop(_CONFIG_ATTR, None)
    for ref in list(iter_quantizers(model)):
        module = ref.module
        if ref.role is Role.WEIGHT:
            remove_parametrization(module, _quantized_weight_name(module, ref.quantizer), ref.quantizer)
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


def _quantized_weight_name(module: nn.Module, quantizer: TensorQuantizer) -> str:
    """The name of the tensor whose parametrizations hold ``quantizer``."""
    for name, plist in module.parametrizations.items():
        if any(p is quantizer for p in plist):
            return name
    raise KeyError(f"{type(module).__name__} has no parametrization holding this weight quantizer")


def set_mode(model: nn.Module, mode: "QuantizerMode | str", *, role: "Optional[Role | str]" = None,
             names: Optional[List[str]] = None) -> None:
    """Sets the mode of all (or the selected) quantizers."""
    role = None if role is None else Role(role)
    for ref in iter_quantizers(model):
        if role is not None and ref.role is not role:
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
            quantizer.off()
        yield model
    finally:
        for quantizer, mode in saved:
            quantizer.restore(mode)


def float_layers(model: nn.Module, refs: Optional[Iterable[QuantizerRef]] = None) -> List[str]:
    """Names of the quantized layers whose quantizers are all off (kept in floating point), sorted.

    Args:
        model: The quantized model.
        refs: Its quantizers, if the caller already listed them (saves a walk of the module tree).
    """
    modes: Dict[str, List[QuantizerMode]] = {}
    for ref in iter_quantizers(model) if refs is None else refs:
        modes.setdefault(ref.module_name, []).append(ref.quantizer.mode)
    return sorted(m for m, ms in modes.items() if all(x is QuantizerMode.OFF for x in ms))
