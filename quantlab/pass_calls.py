"""The quantized layers' calls during a statistics pass: the same results, less host time per call.

A statistics pass calls every quantized layer once per batch, and two parts of that call
cost host time for nothing there (on a GPU host that time can make the pass host-bound):

* reading the weight runs torch's parametrization machinery (a property, the
  ParametrizationList and the quantizer's module call) to return the stored tensor
  itself, since the weight quantizer is off during the pass;
* the input quantizer's forward pre-hook sends every call through ``nn.Module``'s slow
  path (any hook on a module does), which costs more than the hook itself.

Inside :func:`pass_calls` each quantized module takes a stand-in class: a subclass of its
class whose weight property returns the stored tensor in exactly that state (and runs the
parametrizations in any other: a quantizer switched on, a 2:4 mask stacked on the weight, a
hook on those calls), and whose ``forward`` runs quantlab's input hook first, the hook being
taken off the module's hook table meanwhile, where that runs it at the same point of the
call: quantlab's hook is the module's last forward pre-hook, no backward hooks are set on the
module, and its calls go through ``nn.Module.__call__`` to the class's ``forward`` (no
``forward`` set on the instance, not compiled). So every call returns and observes what it
would outside. On exit each module gets its class back and the hook its place in the table
(after the pre-hooks registered before it). A deep copy made inside has the usual class and
the hook. A block inside another changes nothing more. Inside the block, parametrizations of
these modules must not be registered or removed (torch would change the stand-in class, which
is put away on exit), and a forward pre-hook registered on one of them inside the block runs
before quantlab's observation there (after it once the block ends): a statistics pass does neither.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from quantlab.attach import (QuantizerRef, _calls_plainly, _input_hook, _quantized_weight_name, is_input_hook,
                             iter_quantizers)
from quantlab.tensor_quantizer import QuantizerMode, Role, TensorQuantizer

# The attribute of a parametrized class that holds its stand-in classes, and the attribute that marks
# a stand-in (with the class it stands in for).
_STAND_INS = "_quantlab_pass_classes"
_STANDS_IN_FOR = "_quantlab_pass_class_of"
# In a module's __dict__ while quantlab's input hook runs from its forward: the hook's key in the tables.
_MOVED_HOOK = "_quantlab_moved_input_hook"


def _direct_read(tensor_name: str, evaluate: Any) -> Any:
    """The getter of ``tensor_name`` that returns the stored tensor while its only parametrization is an
    off weight quantizer, and otherwise what torch's getter ``evaluate`` computes."""

    def read(self: nn.Module) -> torch.Tensor:
        plist = self.__dict__["_modules"]["parametrizations"]._modules[tensor_name]
        chain = plist._modules
        if len(chain) == 1:
            (only,) = chain.values()
            # Off, a quantizer returns its input itself (TensorQuantizer.forward): the stored tensor, unless
            # a hook or a wrapper on the calls that would compute it must see them run.
            if (isinstance(only, TensorQuantizer) and only._mode is QuantizerMode.OFF and _calls_plainly(only)
                    and _calls_plainly(plist)):
                original = plist._parameters.get("original")
                if original is not None:
                    return original
        return evaluate(self)

    return read


def _observing_forward(base_forward: Any) -> Any:
    """``base_forward`` with quantlab's input hook run first, as ``nn.Module.__call__`` would have run it."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        changed = _input_hook(self, args, kwargs)
        if changed is not None:
            args, kwargs = changed
        return base_forward(self, *args, **kwargs)

    return forward


def _stand_in(cls: type, tensor_name: str, observe: bool) -> Optional[type]:
    """The stand-in for torch's parametrized class ``cls`` (None if ``cls`` is not one, or is a stand-in).

    Kept on ``cls`` (torch makes one parametrized class per module; deep copies share it), and
    rebuilt where a class copied from ``cls`` (:func:`quantlab.attach._own_class`) brought along another's.
    """
    parametrized = cls.__dict__.get(tensor_name)
    if not isinstance(parametrized, property) or parametrized.fget is None or _STANDS_IN_FOR in cls.__dict__:
        return None  # not torch's parametrized class, or already a stand-in (a block inside another)
    classes = cls.__dict__.get(_STAND_INS)
    if classes is None or classes.get("__base__") is not cls:
        classes = {"__base__": cls}
        setattr(cls, _STAND_INS, classes)
    key = (tensor_name, observe)
    if key in classes:
        return classes[key]

    def deep_copy(self: nn.Module, memo: Dict[int, Any]) -> nn.Module:
        replica = cls.__deepcopy__(self, memo)
        if type(replica) is stand_in:  # a copy made inside the block is a usual module
            replica.__class__ = cls
            _put_hook_back(replica)
        return replica

    namespace = {tensor_name: property(_direct_read(tensor_name, parametrized.fget), parametrized.fset),
                 "__deepcopy__": deep_copy, _STANDS_IN_FOR: cls, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__}
    if observe:
        namespace["forward"] = _observing_forward(cls.forward)
    stand_in = type(cls.__name__, (cls,), namespace)
    classes[key] = stand_in
    return stand_in


def _hook_can_move(module: nn.Module) -> Optional[int]:
    """The key of quantlab's input hook if running it from ``forward`` runs it at the same point of the call."""
    hooks = module._forward_pre_hooks
    if not hooks or module._backward_hooks or module._backward_pre_hooks or "forward" in module.__dict__:
        return None
    if type(module).__call__ is not nn.Module.__call__ or getattr(module, "_compiled_call_impl", None) is not None:
        return None
    key = next(reversed(hooks))  # the last pre-hook runs right before forward
    return key if is_input_hook(hooks[key]) and module._forward_pre_hooks_with_kwargs.get(key) else None


def _take_hook_off(module: nn.Module, key: int) -> None:
    del module._forward_pre_hooks[key]
    del module._forward_pre_hooks_with_kwargs[key]
    module.__dict__[_MOVED_HOOK] = key


def _put_hook_back(module: nn.Module) -> None:
    """Puts quantlab's input hook back in ``module``'s table, right after the pre-hooks registered before it."""
    key = module.__dict__.pop(_MOVED_HOOK, None)
    if key is None:
        return
    hooks = module._forward_pre_hooks
    items = list(hooks.items())
    # Hook keys grow with each registration: the ones below this key were there before it.
    position = max((i + 1 for i, (k, _) in enumerate(items) if k < key), default=0)
    hooks.clear()
    hooks.update(items[:position] + [(key, _input_hook)] + items[position:])
    module._forward_pre_hooks_with_kwargs[key] = True


@contextlib.contextmanager
def pass_calls(model: nn.Module, refs: Optional[Iterable[QuantizerRef]] = None, *,
               observe_in_forward: bool = True) -> Iterator[nn.Module]:
    """Inside the block, the quantized layers of ``model`` run their statistics-pass calls the cheap way.

    Args:
        model: The quantized model.
        refs: Its quantizers, if the caller already listed them (saves a walk of the module tree).
        observe_in_forward: Also run quantlab's input hook from the stand-in's ``forward`` where
            that is equivalent (see the module's docstring); else only the weights are read directly.
    """
    swapped: List[Tuple[nn.Module, type]] = []
    try:
        for ref in iter_quantizers(model) if refs is None else refs:
            if ref.role is not Role.WEIGHT:
                continue
            module, cls = ref.module, type(ref.module)
            key = _hook_can_move(module) if observe_in_forward else None
            stand_in = _stand_in(cls, _quantized_weight_name(module, ref.quantizer), key is not None)
            if stand_in is None:
                continue
            module.__class__ = stand_in
            swapped.append((module, cls))
            if key is not None:
                _take_hook_off(module, key)
        yield model
    finally:
        for module, cls in reversed(swapped):
            module.__class__ = cls
            _put_hook_back(module)


def direct_weight_reads(model: nn.Module, refs: Optional[Iterable[QuantizerRef]] = None) -> "contextlib.AbstractContextManager[nn.Module]":
    """:func:`pass_calls` for the weights alone: a quantized weight read while its quantizer is off is the
    stored tensor, read directly; the input hooks stay where they are."""
    return pass_calls(model, refs, observe_in_forward=False)
