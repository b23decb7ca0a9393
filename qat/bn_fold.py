"""Conv+BatchNorm folding for QAT.

TensorRT folds an inference BatchNorm into the preceding convolution before it
quantizes the weights, so the weights it rounds are
``w_fold = w * gamma / sqrt(running_var + eps)`` (per output channel). A
:class:`QATConvBn2d` (1d/3d alike) fake-quantizes exactly that tensor during
training, following the recipe of Jacob et al. (2018) and Krishnamoorthi (2018)
as in PyTorch's ``ConvBn`` QAT modules:

    y = conv(x, fq(w * sf) / sf) + b,   sf = gamma / sqrt(running_var + eps)
    out = BatchNorm(y)       # batch statistics while training, running ones once frozen

With quantization off, ``y == conv(x, w) + b`` and the module equals Conv+BN in
both train and eval mode. After :func:`freeze_bn_stats` (or ``freeze_bn_after``
training steps) BatchNorm uses and keeps its running statistics, and the module
computes exactly what the folded INT8 convolution computes at deployment.

The conv keeps its name (so scales files of the unfolded model still match);
the BatchNorm's place holds an ``nn.Identity`` while folded. :func:`baked_state`
gives the original layout's tensors with the folding baked in (what
``quantlab.qat.save`` writes) and :func:`undo_fold` puts the original modules back.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from quantlab.algorithms.bn_fold import bn_scale_shift
from quantlab.algorithms.input_shift import SHIFT_BUFFER
from quantlab.attach import weight_quantizer
from quantlab.qat.errors import QATError

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FROZEN_HOOK = "_quantlab_bn_frozen_hook"


class _QATConvBnMixin:
    """Shared forward of the folded Conv+BN modules (mixed into Conv1d/2d/3d)."""

    bn: nn.Module
    train_steps: int
    bn_frozen: bool
    freeze_bn_after: Optional[int]

    def _init_fold(self, bn: nn.Module, freeze_bn_after: Optional[int]) -> None:
        self.bn = bn
        self.freeze_bn_after = freeze_bn_after
        self.train_steps = 0
        self.bn_frozen = False

    # The step counter and the frozen flag travel in the state_dict (resume).
    def get_extra_state(self) -> Dict[str, Any]:
        return {"train_steps": int(self.train_steps), "bn_frozen": bool(self.bn_frozen)}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.train_steps = int(state.get("train_steps", 0))
        self.bn_frozen = bool(state.get("bn_frozen", False))

    def raw_weight(self) -> torch.Tensor:
        """The floating-point conv weight (not fake-quantized, not folded)."""
        if parametrize.is_parametrized(self, "weight"):
            return self.parametrizations.weight.original
        return self.weight

    def fold_factor(self) -> torch.Tensor:
        """``gamma / sqrt(running_var + eps)`` per output channel (running statistics; the PTQ fold's math)."""
        return bn_scale_shift(self.bn)[0]

    def folded_weight(self) -> torch.Tensor:
        """The weight TensorRT will quantize: ``w * fold_factor`` per output channel."""
        w = self.raw_weight()
        return w * self.fold_factor().reshape([-1] + [1] * (w.dim() - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.train_steps += 1
            if self.freeze_bn_after is not None and self.train_steps > self.freeze_bn_after:
                self.bn_frozen = True
        sf = self.fold_factor()
        # A channel with gamma == 0 outputs a constant: quantize its raw weight instead of 0/0.
        sf = torch.where(sf == 0, 1.0, sf)
        w = self.raw_weight()
        shape = [-1] + [1] * (w.dim() - 1)
        w = w * sf.reshape(shape)
        quantizer = weight_quantizer(self)
        if quantizer is not None:
            w = quantizer(w)
        # conv(x, fq(w * sf)) / sf == conv(x, fq(w * sf) / sf): sf is per output channel,
        # so the un-scaling touches the weight, not the (much larger) activation.
        y = self._conv_forward(x, w / sf.reshape(shape), self.bias)
        # A frozen BN normalizes with (and keeps) its running statistics even in train mode.
        self.bn.train(self.training and not self.bn_frozen)
        return self.bn(y)


class QATConvBn1d(_QATConvBnMixin, nn.Conv1d):
    """Conv1d + BatchNorm1d, weights fake-quantized after folding."""


class QATConvBn2d(_QATConvBnMixin, nn.Conv2d):
    """Conv2d + BatchNorm2d, weights fake-quantized after folding."""


class QATConvBn3d(_QATConvBnMixin, nn.Conv3d):
    """Conv3d + BatchNorm3d, weights fake-quantized after folding."""


_FOLDED_TYPES = {nn.Conv1d: QATConvBn1d, nn.Conv2d: QATConvBn2d, nn.Conv3d: QATConvBn3d}


def is_folded(module: nn.Module) -> bool:
    return isinstance(module, _QATConvBnMixin)


def folded_modules(model: nn.Module) -> Iterable[Tuple[str, "_QATConvBnMixin"]]:
    return [(name, m) for name, m in model.named_modules() if is_folded(m)]


def _conv_type(conv: nn.Module) -> Optional[type]:
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if type(conv) is base:
            return base
    return None


def _can_fold(conv: nn.Module, bn: nn.Module) -> bool:
    # A conv whose input input-shift moved adds shift * sum(W) after its output (a hook the folded
    # module would not carry, and which would land after the BatchNorm): it keeps its own BatchNorm.
    return (
        _conv_type(conv) is not None
        and not hasattr(conv, SHIFT_BUFFER)
        and isinstance(bn, _BN_TYPES)
        and bn.track_running_stats
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
    )


def find_conv_bn_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """Finds ``(conv name, bn name)`` pairs where the conv's only consumer is the BatchNorm.

    Uses ``torch.fx`` tracing; if the model cannot be traced, falls back to
    adjacent children of ``nn.Sequential`` containers.
    """
    modules = dict(model.named_modules())
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure: use the structural fallback
        return _sequential_pairs(model)
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN_TYPES):
            continue
        src = node.args[0] if node.args else None
        if getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            continue
        conv, bn = modules.get(src.target), modules[node.target]
        if calls.get(src.target) == 1 and calls.get(node.target) == 1 and _can_fold(conv, bn):
            pairs.append((src.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if _can_fold(conv, bn):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + cname, prefix + bname))
    return pairs


_FOLD_ATTRS = ("train_steps", "bn_frozen", "freeze_bn_after", "bn_name")


def _copy_conv_attributes(src: nn.Module, dst: nn.Module) -> None:
    """Copies a conv's hyper-parameters (not its hooks or parameters) onto a new module."""
    for key, value in src.__dict__.items():
        if (not key.startswith("_") and key not in _FOLD_ATTRS) or key == "_reversed_padding_repeated_twice":
            dst.__dict__[key] = value


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_conv_bn(
    model: nn.Module,
    pairs: Optional[Sequence[Tuple[str, str]]] = None,
    *,
    freeze_bn_after: Optional[int] = None,
) -> List[Tuple[str, str]]:
    """Replaces every Conv followed by BatchNorm with a folded QAT module, in place.

    The new module reuses the conv's Parameter objects and the BatchNorm module,
    so optimizers built earlier keep working.

    Args:
        model: A model without quantizers.
        pairs: ``(conv name, bn name)`` pairs; default :func:`find_conv_bn_pairs`.
        freeze_bn_after: Freeze BN statistics after this many training forwards.

    Returns:
        The pairs that were folded.

    Raises:
        QATError: a named pair cannot be folded (wrong types, BN without running statistics).
    """
    pairs = list(find_conv_bn_pairs(model) if pairs is None else pairs)
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if conv is None or bn is None or not _can_fold(conv, bn):
            raise QATError(
                f"cannot fold BatchNorm '{bn_name}' into '{conv_name}': need a plain Conv1d/2d/3d followed by a "
                "BatchNorm with running statistics and matching channels"
                + (" (and the conv's input is moved by input-shift)" if hasattr(conv, SHIFT_BUFFER) else "")
            )
        cls = _FOLDED_TYPES[_conv_type(conv)]
        folded = cls.__new__(cls)
        nn.Module.__init__(folded)
        # Take over the conv's state (hyper-parameters and the same Parameter objects).
        _copy_conv_attributes(conv, folded)
        folded._parameters = dict(conv._parameters)
        folded._buffers = dict(conv._buffers)
        folded._init_fold(bn, freeze_bn_after)
        folded.bn_name = bn_name  # where the BatchNorm goes back on unfold()
        folded.train(conv.training)
        _set_submodule(model, conv_name, folded)
        _set_submodule(model, bn_name, nn.Identity())
    return pairs


def freeze_bn_stats(model: nn.Module) -> int:
    """Makes every BatchNorm use and keep its running statistics from now on, even in train mode.

    Folded modules switch their flag; plain BatchNorm modules get a forward
    pre-hook that keeps them in eval behaviour (``model.train()`` would undo a
    plain ``bn.eval()``). Returns the number of BatchNorm layers frozen.
    """
    count = 0
    for module in model.modules():
        if is_folded(module):
            module.bn_frozen = True
            count += 1
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and _FROZEN_HOOK not in module.__dict__:
            if any(is_folded(m) and m.bn is module for m in model.modules()):
                continue
            handle = module.register_forward_pre_hook(_keep_eval)
            object.__setattr__(module, _FROZEN_HOOK, handle)
            count += 1
    return count


def _keep_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def baked_state(module: "_QATConvBnMixin", conv_prefix: str, bn_prefix: str) -> Dict[str, torch.Tensor]:
    """State of the original Conv and BatchNorm with the folding baked in.

    The conv holds ``w_fold`` (its bias, if any, zeroed) and the BatchNorm
    becomes a neutral affine layer: running mean 0, running var ``1 - eps``,
    gamma 1, beta = the folded bias. These tensors load into the user's
    unmodified model class, and when TensorRT folds that BatchNorm it scales the
    weights by 1, so it rounds exactly the tensor QAT trained.

    Args:
        module: A folded module.
        conv_prefix: State-dict prefix of the conv (``"block1.conv1."``).
        bn_prefix: State-dict prefix of the BatchNorm (``"block1.bn1."``).
    """
    bn = module.bn
    with torch.no_grad():
        sf = module.fold_factor()
        bias = module.bias if module.bias is not None else torch.zeros_like(sf)
        shift = (bias - bn.running_mean) * sf + (bn.bias if bn.bias is not None else 0.0)
        if bn.weight is None and bool((shift != 0).any()):
            raise QATError(f"BatchNorm '{bn_prefix[:-1]}' has no affine bias to hold the folded shift")
        out = {conv_prefix + "weight": module.folded_weight().detach().clone()}
        if module.bias is not None:
            out[conv_prefix + "bias"] = torch.zeros_like(module.bias)
        if bn.weight is not None:
            out[bn_prefix + "weight"] = torch.ones_like(bn.weight)
            out[bn_prefix + "bias"] = shift.detach().clone()
        out[bn_prefix + "running_mean"] = torch.zeros_like(bn.running_mean)
        out[bn_prefix + "running_var"] = torch.full_like(bn.running_var, 1.0 - bn.eps)
        if bn.num_batches_tracked is not None:
            out[bn_prefix + "num_batches_tracked"] = bn.num_batches_tracked.clone()
    return out


def undo_fold(model: nn.Module) -> nn.Module:
    """Puts the original Conv and BatchNorm modules back, unchanged (no folding baked in), in place."""
    for name, module in list(folded_modules(model)):
        if parametrize.is_parametrized(module):
            raise QATError(f"remove the quantizers before undoing the fold of '{name}'")
        base = _conv_type_of_folded(module)
        conv = base.__new__(base)
        nn.Module.__init__(conv)
        _copy_conv_attributes(module, conv)
        conv._parameters = dict(module._parameters)
        conv._buffers = dict(module._buffers)
        conv._modules = {}
        _set_submodule(model, name, conv)
        _set_submodule(model, module.bn_name, module.bn)
    return model


def _conv_type_of_folded(module: nn.Module) -> type:
    for folded, base in ((QATConvBn1d, nn.Conv1d), (QATConvBn2d, nn.Conv2d), (QATConvBn3d, nn.Conv3d)):
        if isinstance(module, folded):
            return base
    raise TypeError(type(module).__name__)

