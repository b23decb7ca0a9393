"""``cle``: cross-layer equalization (Nagel et al., "Data-Free Quantization", ICCV 2019).

For two layers ``first -> f -> second`` where ``f`` is positive-homogeneous
(``f(x / s) = f(x) / s`` for ``s > 0``: ReLU, LeakyReLU, PReLU, identity,
dropout, pooling), dividing output channel ``i`` of ``first`` (weights and bias)
by ``s_i`` and multiplying input channel ``i`` of ``second`` by ``s_i`` keeps the
function. With ``r1_i = max|W1[i]|`` and ``r2_i = max|W2[:, i]|``,
``s_i = sqrt(r1_i / r2_i)`` (= ``sqrt(r1_i r2_i) / r2_i``) makes both ranges
``sqrt(r1_i r2_i)``: a depthwise conv whose channels span ranges 100x apart
(hopeless on an INT8 grid shared by a tensor) hands its spread to the next
layer's input channels. Sweeps over all pairs repeat until the scales stop
changing.

BatchNorms are folded first (:mod:`quantlab.algorithms.bn_fold`). ReLU6 and
Hardtanh are not positive-homogeneous (their clip is fixed). By default
(``relu6="clamp"``) the clip of channel ``i`` becomes ``6 / s_i``, which keeps the
FP32 function exactly: a ReLU6 called at one place becomes a
:class:`ChannelClamp`; a ReLU6 module shared by several call sites (EfficientNet
reuses one per block) becomes ``nn.ReLU`` and the per-channel upper bound moves
into a :class:`ChannelClamp` in the folded BatchNorm's place in front of each call
site (``relu(min(x, u)) == clamp(x, 0, u)`` for ``u >= 0``); where a site has no
such place the pairs through that ReLU6 are skipped. ``relu6="skip"`` skips every
pair through a clip. Both are reported.

``balance="activations"`` (with calibration data) chooses the scales from the
measured per-channel range ``a_i`` of the second layer's input instead:
``s_i = a_i^alpha / r2_i^(1 - alpha)``, and ``alpha = 1`` before a depthwise layer.
With per-channel weight scales (TensorRT's default) rescaling a row of the first
layer costs nothing, nor does rescaling a depthwise layer's channel; what CLE
can improve there is the per-tensor INT8 grid of the activation between the two
layers, whose channels then span equal ranges (the conv counterpart of
SmoothQuant, folded exactly into the layer before). DFQ's weight balance is
meant for per-tensor weights.

Measured on EfficientNet-Lite1 (benchmarks/RESULTS.md): CLE does not help there.
Its ReLU6 clips saturate, so nearly every channel of an activation already peaks
at 6 (balanced for a per-tensor grid); equalizing the weights gives each channel
its own clip ``6 / s_i`` and unbalances the activations, which costs more than the
weights gain (per-channel weights gain nothing at all). CLE is for nets whose
activation ranges differ per channel (ReLU nets, per-tensor weights).

Parameters (``algorithm_params={"cle": {...}}``):
    relu6: ``"clamp"`` (default) or ``"skip"``.
    balance: ``"weights"`` (default, DFQ, data-free) or ``"activations"``.
    alpha: Activation share for ``balance="activations"`` where the second layer
        mixes channels (default 0.5).
    iterations: Most sweeps over all pairs (default 100).
    tolerance: Stop once no scale changes by more than this factor, as
        ``max |log s|`` of a sweep (default 1e-4).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from quantlab.algorithms._graph import Dataflow, set_submodule, trace
from quantlab.algorithms.base import AlgorithmContext, AlgorithmError, Stage, register_algorithm
from quantlab.algorithms.bn_fold import fold_batchnorms, is_plain_layer
from quantlab.attach import is_quantized

ORDER = 20  # after bn-fold (10); SmoothQuant and the statistics pass come later
_PARAMS = {"relu6": ("clamp", "skip"), "balance": ("weights", "activations"), "alpha": None, "iterations": None,
           "tolerance": None}


class ChannelClamp(nn.Module):
    """``min(max(x, lower), upper)`` with one bound per channel (a ReLU6 whose clip CLE rescaled).

    Bounds are buffers shaped to broadcast against the activation (``[C, 1, 1]`` for
    a conv output, ``[C]`` for a Linear output, ``[]`` for one bound); ``-inf``/``inf``
    means no bound. It exports as ONNX ``Max``/``Min`` with constant operands.
    """

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("lower", lower.detach().clone().float())
        self.register_buffer("upper", upper.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(x, self.lower.to(x.dtype)), self.upper.to(x.dtype))

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}"


# Modules with f(x / s) = f(x) / s for s > 0 per channel; pools only on conv outputs.
_HOMOGENEOUS = (nn.Identity, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_GLOBAL_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_CLIPS = (nn.ReLU6, nn.Hardtanh)  # ReLU6 is a Hardtanh(0, 6)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.dropout, F.prelu}
_CLIP_FUNCTIONS = {F.relu6, F.hardtanh, torch.clamp, torch.clip}


@dataclasses.dataclass
class _Pair:
    first: str
    second: str
    through: List[str]
    clips: List["_Clip"]  # clip modules on the path (before they become ChannelClamps)
    clamps: List[str] = dataclasses.field(default_factory=list)  # ChannelClamp names whose bounds scale with s


@dataclasses.dataclass
class _Clip:
    name: str  # the clip module
    module: nn.Module
    layout: str  # "conv" (channels on dim 1) or "linear" (channels last) where it acts
    slot: Optional[str]  # the module called right before it on the path (a folded BN's Identity, if any)


@dataclasses.dataclass
class _Stop:
    reason: str
    notable: bool  # worth a line in the report (a near pair), not just "output feeds an add"


def _is_layer(module: Optional[nn.Module]) -> bool:
    return is_plain_layer(module)


def _in_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return int(layer.weight.shape[1]) * int(layer.groups)


def _is_global(pool: nn.Module) -> bool:
    size = pool.output_size
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return all(s == 1 for s in sizes)


def _flattens_channels(node: fx.Node, pooled: bool) -> bool:
    """Whether ``node`` turns a ``[N, C, 1, ...]`` tensor into ``[N, C]`` (a flatten after a global pool)."""
    if not pooled:
        return False
    if node.op == "call_method" and node.target == "flatten" or node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        return len(sizes) == 2 and sizes[1] == -1
    return False


def _follow(flow: Dataflow, start: fx.Node) -> Tuple[Optional[_Pair], Optional[_Stop]]:
    """Walks from a layer's output through channel-wise ops to the next layer."""
    first = flow.module(start)
    layout = "linear" if isinstance(first, nn.Linear) else "conv"
    through: List[str] = []
    clips: List[_Clip] = []
    pooled = False
    node = start
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None, _Stop(f"'{node.name}' feeds {len(users)} ops", False)
        nxt = users[0]
        if not nxt.args or nxt.args[0] is not node:
            return None, _Stop(f"'{nxt.name}' takes it as a later argument", False)
        module = flow.module(nxt)
        if nxt.op == "call_module":
            if _is_layer(module):
                if not flow.called_once(nxt):
                    return None, _Stop(f"'{nxt.target}' is called {flow.calls[nxt.target]} times", True)
                if isinstance(module, nn.Linear) != (layout == "linear"):
                    return None, _Stop(f"'{nxt.target}' takes another layout ({type(module).__name__} after {layout} output)", True)
                channels = int(first.weight.shape[0])
                if _in_channels(module) != channels:
                    return None, _Stop(f"channels differ ({channels} -> {_in_channels(module)} of '{nxt.target}')", True)
                return _Pair(start.target, nxt.target, through, clips), None
            if isinstance(module, _BatchNorm):
                return None, _Stop(f"BatchNorm '{nxt.target}' was not folded", True)
            if isinstance(module, (ChannelClamp,) + _CLIPS):
                slot = node.target if node.op == "call_module" and node is not start else None
                clips.append(_Clip(nxt.target, module, layout, slot))
                through.append(f"{nxt.target} ({type(module).__name__})")
            elif isinstance(module, _HOMOGENEOUS):
                through.append(f"{nxt.target} ({type(module).__name__})")
            elif isinstance(module, _POOLS + _GLOBAL_POOLS) and layout == "conv":
                pooled = isinstance(module, _GLOBAL_POOLS) and _is_global(module)
                through.append(f"{nxt.target} ({type(module).__name__})")
                node = nxt
                continue
            else:
                return None, _Stop(f"'{nxt.target}' ({type(module).__name__}) is not channel-wise positive-homogeneous",
                                   isinstance(module, nn.Module) and not isinstance(module, nn.Sequential))
        elif nxt.op == "call_function" and nxt.target in _CLIP_FUNCTIONS:
            return None, _Stop(f"functional clip {getattr(nxt.target, '__name__', nxt.target)} cannot take per-channel "
                               "bounds (use an nn.ReLU6 module)", True)
        elif (nxt.op == "call_function" and nxt.target in _HOMOGENEOUS_FUNCTIONS) or (
                nxt.op == "call_method" and nxt.target in ("relu", "relu_")):
            through.append(nxt.name)
        elif nxt.op == "call_function" and nxt.target is F.adaptive_avg_pool2d and layout == "conv":
            size = nxt.args[1] if len(nxt.args) > 1 else nxt.kwargs.get("output_size")
            pooled = size == 1 or size == (1, 1) or size == [1, 1]
            through.append(nxt.name)
            node = nxt
            continue
        elif _flattens_channels(nxt, pooled):
            layout = "linear"
            through.append(nxt.name)
        else:
            target = getattr(nxt.target, "__name__", nxt.target)
            return None, _Stop(f"'{nxt.name}' ({target}) is not channel-wise",
                           nxt.op != "output" and nxt.target not in (operator.add, operator.iadd, torch.add, torch.cat))
        node = nxt


def _clip_bounds(module: nn.Module) -> Tuple[float, float]:
    return float(module.min_val), float(module.max_val)


def _plan_clips(flow: Dataflow, pairs: List[_Pair], policy: str, skipped: List[Dict[str, str]]) -> Tuple[List[_Pair], Dict[str, Any]]:
    """Decides how each clip on a pair's path keeps the function; drops the pairs where none can.

    Returns the kept pairs and, per clip module, ``("own", None)`` (it becomes a
    ChannelClamp) or ``("sites", slots)`` (it becomes a ReLU, the Identity slot in
    front of each of its call sites a ChannelClamp).
    """
    kept: List[_Pair] = []
    plans: Dict[str, Any] = {}
    refused: Dict[str, str] = {}
    for pair in pairs:
        reason = None
        for clip in pair.clips:
            if isinstance(clip.module, ChannelClamp) or clip.name in plans:
                continue
            kind = type(clip.module).__name__
            if policy == "skip":
                reason = f"{kind} '{clip.name}' is not positive-homogeneous (relu6='skip')"
                break
            if clip.name in refused:
                reason = refused[clip.name]
                break
            if flow.calls[clip.name] == 1:
                plans[clip.name] = ("own", None)
                continue
            lower, upper = _clip_bounds(clip.module)
            sites = [n for n in flow.module_nodes() if n.target == clip.name]
            slots = []
            for site in sites:
                src = site.args[0] if site.args else None
                if (getattr(src, "op", None) == "call_module" and isinstance(flow.module(src), nn.Identity)
                        and flow.called_once(src) and len(src.users) == 1):
                    slots.append(src.target)
            if lower != 0.0 or upper < 0.0 or len(slots) != len(sites):
                why = ("its lower bound is not 0" if lower != 0.0 or upper < 0.0 else
                       "a call site has no folded-BatchNorm (Identity) slot in front of it for per-channel bounds")
                reason = refused[clip.name] = f"{kind} '{clip.name}' is called at {len(sites)} places and {why}"
                break
            plans[clip.name] = ("sites", slots)
        if reason:
            skipped.append({"first": pair.first, "second": pair.second, "reason": reason})
        else:
            kept.append(pair)
    return kept, plans


def _bound_shape(layout: str, layer: nn.Module) -> List[int]:
    channels = int(layer.weight.shape[0])
    if layout == "linear":
        return [channels]
    return [channels] + [1] * (layer.weight.dim() - 2)


def _apply_clip_plans(model: nn.Module, flow: Dataflow, pairs: List[_Pair], plans: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Replaces the planned clips by per-channel clamps (exact); records each pair's clamps."""
    modules = flow.modules
    shapes: Dict[str, List[int]] = {}  # the ChannelClamp's name -> bound shape
    for pair in pairs:
        for clip in pair.clips:
            if isinstance(clip.module, ChannelClamp):  # from an earlier run: give it per-channel bounds
                shape = _bound_shape(clip.layout, modules[pair.first])
                if list(clip.module.upper.shape) != shape:
                    clip.module.lower = clip.module.lower.expand(shape).clone()
                    clip.module.upper = clip.module.upper.expand(shape).clone()
                pair.clamps.append(clip.name)
                continue
            where = clip.name if plans[clip.name][0] == "own" else clip.slot
            shapes[where] = _bound_shape(clip.layout, modules[pair.first])
            pair.clamps.append(where)
    changes: List[Dict[str, Any]] = []
    for name, (kind, slots) in plans.items():
        lower, upper = _clip_bounds(modules[name])
        was = type(modules[name]).__name__
        if kind == "own":
            shape = shapes[name]
            set_submodule(model, name, ChannelClamp(torch.full(shape, lower), torch.full(shape, upper)))
            changes.append({"module": name, "was": was, "now": "ChannelClamp"})
            continue
        for slot in slots:  # sites off every pair keep one bound
            shape = shapes.get(slot, [])
            set_submodule(model, slot, ChannelClamp(torch.full(shape, -math.inf), torch.full(shape, upper)))
        set_submodule(model, name, nn.ReLU())
        changes.append({"module": name, "was": was, "now": "ReLU", "upper_bounds_in": list(slots)})
    return changes


def find_pairs(model: nn.Module, flow: Dataflow) -> Tuple[List[_Pair], List[Dict[str, str]], int]:
    """Every ``layer -> channel-wise ops -> layer`` pair; the near misses with reasons; the count of other ends."""
    pairs, skipped, others = [], [], 0
    for node in flow.module_nodes():
        if not _is_layer(flow.module(node)):
            continue
        if not flow.called_once(node):
            skipped.append({"first": node.target, "reason": f"'{node.target}' is called {flow.calls[node.target]} times"})
            continue
        pair, stop = _follow(flow, node)
        if pair is not None:
            pairs.append(pair)
        elif stop.notable:
            skipped.append({"first": node.target, "reason": stop.reason})
        else:
            others += 1
    return pairs, skipped, others


def _input_channel_rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``weight`` ([out, in/groups, ...] or Linear [out, in]) as ``[in, everything that input channel touches]``."""
    out, per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, out // groups, per_group, -1)
    return w.permute(0, 2, 1, 3).reshape(groups * per_group, -1)


def _scale_inputs(weight: torch.Tensor, groups: int, scale: torch.Tensor) -> torch.Tensor:
    out, per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, out // groups, per_group, -1) * scale.reshape(groups, 1, per_group, 1)
    return w.reshape(weight.shape)


def equalize(model: nn.Module, pairs: List[_Pair], iterations: int, tolerance: float,
             activations: Optional[List[torch.Tensor]] = None, alpha: float = 0.5) -> Dict[str, Any]:
    """Scales the pairs' weights, biases and clamp bounds until the scales settle (float64 on the way).

    Args:
        activations: Per pair, the measured per-channel max |input| of its second layer
            (``balance="activations"``); None for DFQ's weight ranges.
        alpha: Activation share of the balance where the second layer mixes channels (a
            depthwise second layer rescales per channel for free: there alpha is 1).
    """
    modules = dict(model.named_modules())
    names = sorted({p.first for p in pairs} | {p.second for p in pairs})
    weights = {n: modules[n].weight.detach().double().clone() for n in names}
    biases = {n: modules[n].bias.detach().double().clone() for n in names if modules[n].bias is not None}
    groups = {n: int(getattr(modules[n], "groups", 1)) for n in names}
    totals = [torch.ones(weights[p.first].shape[0], dtype=torch.float64) for p in pairs]
    before = [_ranges(weights, groups, p) for p in pairs]
    change, sweeps = math.inf, 0
    while sweeps < iterations and change > tolerance:
        sweeps += 1
        change = 0.0
        for index, pair in enumerate(pairs):
            r1, r2 = _ranges(weights, groups, pair)
            if activations is None:
                s = torch.sqrt(r1 / r2)
                ok = (r1 > 0) & (r2 > 0)
            else:  # the activation's range now is the measured one over the scales applied so far
                act = activations[index] / totals[index]
                share = 1.0 if _is_depthwise(modules[pair.second]) else alpha
                s = act.pow(share) / r2.pow(1.0 - share)
                ok = (act > 0) & (r2 > 0)
            s = torch.where(ok & torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
            w1 = weights[pair.first]
            weights[pair.first] = w1 / s.reshape([-1] + [1] * (w1.dim() - 1))
            if pair.first in biases:
                biases[pair.first] = biases[pair.first] / s
            weights[pair.second] = _scale_inputs(weights[pair.second], groups[pair.second], s)
            totals[index] = totals[index] * s
            change = max(change, float(s.log().abs().max()))
    with torch.no_grad():
        for n in names:
            modules[n].weight.copy_(weights[n].to(modules[n].weight.dtype))
            if n in biases:
                modules[n].bias.copy_(biases[n].to(modules[n].bias.dtype))
        for pair, total in zip(pairs, totals):
            for name in pair.clamps:
                clamp = modules[name]  # per-channel bounds, shaped for the activation
                shape = clamp.upper.shape
                clamp.lower.copy_((clamp.lower.double() / total.reshape(shape)).float())
                clamp.upper.copy_((clamp.upper.double() / total.reshape(shape)).float())
    report = []
    for pair, total, (b1, b2) in zip(pairs, totals, before):
        a1, a2 = _ranges(weights, groups, pair)
        report.append({
            "first": pair.first, "second": pair.second, "through": pair.through, "clamps": pair.clamps,
            "scale_min": float(total.min()), "scale_max": float(total.max()),
            "first_range_spread_before": _spread(b1), "first_range_spread_after": _spread(a1),
            "max_range_mismatch_before": _mismatch(b1, b2), "max_range_mismatch_after": _mismatch(a1, a2),
        })
    return {"sweeps": sweeps, "converged": change <= tolerance, "last_max_log_scale": change, "pairs": report}


def _is_depthwise(layer: nn.Module) -> bool:
    """Each input channel feeds only its own output channel(s): rescaling it is free under per-channel weights."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and int(layer.weight.shape[1]) == 1 and int(layer.groups) > 1


def measure_inputs(model: nn.Module, pairs: List[_Pair], forward_loop: Callable[[nn.Module], Any]) -> List[torch.Tensor]:
    """Per pair, the max |x| per channel of its second layer's input over the calibration batches (float64, CPU)."""
    modules = dict(model.named_modules())
    maxima: Dict[str, torch.Tensor] = {}

    def hook(name: str, channel_last: bool) -> Callable[..., None]:
        def record(module: nn.Module, args: Tuple[Any, ...]) -> None:
            x = args[0].detach().abs()
            dims = [d for d in range(x.dim()) if d != (x.dim() - 1 if channel_last else 1)]
            m = x.amax(dim=dims).double().cpu()
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)
        return record

    handles = [modules[p.second].register_forward_pre_hook(hook(p.second, isinstance(modules[p.second], nn.Linear)))
               for p in pairs]
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    missing = [p.second for p in pairs if p.second not in maxima]
    if missing:
        raise AlgorithmError(f"cle: the calibration batches never reached {missing[:5]}")
    for p in pairs:
        if not bool(torch.isfinite(maxima[p.second]).all()):
            raise AlgorithmError(f"cle: non-finite activations reach '{p.second}'")
    return [maxima[p.second] for p in pairs]


def _ranges(weights: Dict[str, torch.Tensor], groups: Dict[str, int], pair: _Pair) -> Tuple[torch.Tensor, torch.Tensor]:
    w1 = weights[pair.first]
    r1 = w1.abs().reshape(w1.shape[0], -1).amax(dim=1)
    r2 = _input_channel_rows(weights[pair.second], groups[pair.second]).abs().amax(dim=1)
    return r1, r2


def _spread(r: torch.Tensor) -> float:
    """max / min of the nonzero per-channel ranges."""
    nz = r[r > 0]
    return float(nz.max() / nz.min()) if nz.numel() else 1.0


def _mismatch(r1: torch.Tensor, r2: torch.Tensor) -> float:
    """Largest ``max(r1/r2, r2/r1)`` over channels with both ranges nonzero."""
    ok = (r1 > 0) & (r2 > 0)
    if not bool(ok.any()):
        return 1.0
    ratio = r1[ok] / r2[ok]
    return float(torch.maximum(ratio, 1 / ratio).max())


def _check_params(params: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise AlgorithmError(f"cle: unknown parameter(s) {unknown}; known: {sorted(_PARAMS)}")
    out: Dict[str, Any] = {}
    for key in ("relu6", "balance"):
        value = str(params.get(key, _PARAMS[key][0])).lower()
        if value not in _PARAMS[key]:
            raise AlgorithmError(f"cle: {key} must be one of {list(_PARAMS[key])}, got {params[key]!r}")
        out[key] = value
    try:
        out["iterations"] = int(params.get("iterations", 100))
        out["tolerance"] = float(params.get("tolerance", 1e-4))
        out["alpha"] = float(params.get("alpha", 0.5))
    except (TypeError, ValueError) as exc:
        raise AlgorithmError(f"cle: bad iterations/tolerance/alpha ({exc})") from None
    if out["iterations"] < 1 or not out["tolerance"] > 0 or not math.isfinite(out["tolerance"]):
        raise AlgorithmError(f"cle: iterations must be >= 1 and tolerance > 0, got {out['iterations']}, {out['tolerance']}")
    if not 0.0 <= out["alpha"] <= 1.0:
        raise AlgorithmError(f"cle: alpha must be in [0, 1], got {out['alpha']}")
    return out


def cross_layer_equalize(model: nn.Module, *, relu6: str = "clamp", balance: str = "weights", alpha: float = 0.5,
                         iterations: int = 100, tolerance: float = 1e-4,
                         forward_loop: Optional[Callable[[nn.Module], Any]] = None) -> Dict[str, Any]:
    """Folds BatchNorms, then equalizes every pair of ``model`` in place; returns the report (JSON-safe).

    Args:
        relu6: ``"clamp"`` (exact per-channel clips) or ``"skip"`` (no pairs through a clip).
        balance: ``"weights"`` (DFQ: ``s = sqrt(r1 / r2)``, data-free) or ``"activations"``
            (``s = a^alpha / r2^(1 - alpha)`` with ``a`` the measured per-channel max of the
            second layer's input; alpha 1 before a depthwise layer; needs ``forward_loop``).
        alpha: See ``balance``.
        iterations: Most sweeps.
        tolerance: Stop when a sweep changes no scale by more than this (``max |log s|``).
        forward_loop: Calibration batches (``balance="activations"``).

    Raises:
        AlgorithmError: the model is quantized already, cannot be traced, has no pair to
            equalize, or activations are asked for without data.
    """
    opts = _check_params({"relu6": relu6, "balance": balance, "alpha": alpha, "iterations": iterations,
                          "tolerance": tolerance})
    if is_quantized(model):
        raise AlgorithmError("cle runs on the floating-point model, before quantizers are attached")
    if opts["balance"] == "activations" and forward_loop is None:
        raise AlgorithmError("cle: balance='activations' needs calibration data (a forward loop)")
    details: Dict[str, Any] = {}
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        details["bn_fold"] = fold_batchnorms(model)
    flow, error = trace(model)
    if flow is None:
        raise AlgorithmError(f"cle needs the model's data flow, and torch.fx cannot trace {type(model).__name__} ({error})")
    candidates, skipped, others = find_pairs(model, flow)
    pairs, plans = _plan_clips(flow, candidates, opts["relu6"], skipped)
    if not pairs:
        near = "; ".join(f"{s['first']}: {s['reason']}" for s in skipped[:5])
        raise AlgorithmError(
            f"cle found no layer pairs to equalize in {type(model).__name__} (it needs Conv/Linear -> ReLU/identity/"
            f"pooling -> Conv/Linear chains{'; ' + near if near else ''})")
    details["clips"] = _apply_clip_plans(model, flow, pairs, plans)
    activations = measure_inputs(model, pairs, forward_loop) if opts["balance"] == "activations" else None
    details.update(equalize(model, pairs, opts["iterations"], opts["tolerance"], activations, opts["alpha"]))
    details.update({"relu6": opts["relu6"], "balance": opts["balance"], "skipped": skipped, "layers_without_pair": others})
    if activations is not None:
        details["alpha"] = opts["alpha"]
    return details


@register_algorithm("cle", Stage.TRANSFORM, ORDER, check=_check_params,
                    params={"relu6": "clamp", "balance": "weights", "alpha": 0.5, "iterations": 100, "tolerance": 1e-4},
                    description="cross-layer equalization (DFQ): folds BatchNorms, equalizes weight (or activation) "
                                "ranges of Conv/Linear pairs; ReLU6 clips become exact per-channel clamps")
def run_cle(model: nn.Module, context: AlgorithmContext) -> Dict[str, Any]:
    """The ``cle`` transform (parameters: ``relu6``, ``balance``, ``alpha``, ``iterations``, ``tolerance``)."""
    return cross_layer_equalize(model, forward_loop=context.forward_loop, **_check_params(dict(context.params)))
