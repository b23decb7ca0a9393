"""Finds where a per-channel SmoothQuant factor can be folded exactly.

A *fold group* is a producer (a LayerNorm / RMSNorm, or a Linear) whose output
channels can be divided by ``s`` by changing the producer's own parameters, and
the Linears (consumers) whose weight columns absorb ``s``, such that the model
computes exactly the same function. That holds when every use of the
producer's output reaches a consumer's input through operations that act on
each channel linearly and separately: reshapes and transposes, multiplication by
a tensor that does not depend on the producer (``act(gate) * up``), attention
(linear in V), ReLU (positive factors only). Anything else (a residual add, a
nonlinearity, a second use of the output) makes the fold inexact: the group is
skipped and the reason reported.

Two steps, both on real calibration inputs:

1. :class:`DataflowTracker` follows, during one forward, every tensor derived
   from each candidate producer's output (a ``TorchFunctionMode``) and records
   which Linears consume it and which operations block the fold.
2. :func:`probe_channel_maps` scales each producer's output channels by distinct
   factors and reads which input channel of each consumer moved by which
   factor: this gives the channel map (identity, or the head repetition of
   grouped-query attention) and proves per-channel linearity on the data.
"""
from __future__ import annotations

import collections
import dataclasses
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

#: Reading a tensor's metadata is not a use of its values.
METADATA_OPS = frozenset({
    "shape", "size", "dim", "ndim", "dtype", "device", "numel", "stride", "is_contiguous", "requires_grad",
    "is_floating_point", "layout", "is_cuda", "names", "data_ptr", "element_size", "nelement", "storage_offset",
    "__len__", "len", "is_complex", "grad_fn", "is_leaf", "is_sparse", "is_quantized", "is_meta",
})
#: Channel-preserving (or channel-relocating) operations: ``f(x / s) = f(x) / s`` per channel.
TRANSPARENT_OPS = frozenset({
    "view", "reshape", "transpose", "permute", "contiguous", "expand", "expand_as", "unsqueeze", "squeeze",
    "flatten", "unflatten", "getitem", "clone", "detach", "to", "type_as", "float", "repeat", "repeat_interleave",
    "dropout", "neg", "view_as", "reshape_as", "cat", "concat", "t", "movedim", "swapaxes",
    # positive-homogeneous: exact for the positive factors SmoothQuant uses
    "relu", "relu_", "leaky_relu",
})


def op_name(func: Any) -> str:
    """A normalized name of a function seen by ``__torch_function__`` (``__rmul__`` -> ``mul``)."""
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # a property such as Tensor.shape
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    name = name.strip("_")
    if name in ("rmul", "imul", "mul_"):
        return "mul"
    if name in ("truediv", "rtruediv", "div_", "itruediv"):
        return "div" if name != "rtruediv" else "rdiv"
    if name == "rmatmul":
        return "rmatmul"
    return name


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm style modules: ``out = normalized * weight (+ bias)`` over the last dimension.

    Whether the fold into ``weight`` really is exact is checked numerically afterwards
    (a norm computing ``(1 + weight) * x`` fails that check and is skipped).
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return False
    bias = getattr(module, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape):
        return False
    if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


@dataclasses.dataclass
class Producer:
    """A candidate producer module.

    Attributes:
        name: Module name.
        kind: ``"norm"`` or ``"linear"``.
        channels: Output channels (last dimension of its output).
    """

    name: str
    kind: str
    channels: int


def candidate_producers(model: nn.Module) -> List[Producer]:
    """Every norm and Linear of ``model``, in registration order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found.append(Producer(name, "linear", module.out_features))
        elif is_norm(module):
            found.append(Producer(name, "norm", module.weight.shape[0]))
    return found


class DataflowTracker(TorchFunctionMode):
    """Taint tracking from each producer's output to the Linears that consume it.

    Args:
        linear_weights: ``id(weight) -> Linear name`` for every Linear (its
            ``F.linear(x, weight)`` call marks it as a consumer of ``x``'s source).
    """

    def __init__(self, linear_weights: Dict[int, str]) -> None:
        super().__init__()
        self.linear_weights = linear_weights
        self._taint: Dict[int, Tuple[Any, str]] = {}
        self.consumers: Dict[str, List[str]] = collections.defaultdict(list)
        self.blockers: Dict[str, List[str]] = collections.defaultdict(list)
        self.paused = False

    def mark(self, tensor: Any, source: str) -> None:
        """Marks ``tensor`` (and tensors nested in it) as derived from ``source``."""
        for leaf in pytree.tree_leaves(tensor):
            if isinstance(leaf, torch.Tensor):
                self._taint[id(leaf)] = (weakref.ref(leaf), source)

    def source_of(self, tensor: torch.Tensor) -> Optional[str]:
        entry = self._taint.get(id(tensor))
        if entry is None:
            return None
        ref, source = entry
        return source if ref() is tensor else None

    def _block(self, source: str, why: str) -> None:
        if why not in self.blockers[source]:
            self.blockers[source].append(why)

    def _allowed(self, name: str, key: Any, args: tuple, kwargs: dict) -> bool:
        """Whether ``name`` with the producer's tensor at argument ``key`` is per-channel linear in it."""
        if name == "linear":  # a consumer: F.linear(x, weight) of a registered Linear
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            return key in (0, "input") and id(weight) in self.linear_weights
        return (name in TRANSPARENT_OPS or name == "mul" or (name == "div" and key == 0)
                or (name in ("matmul", "bmm") and key == 1)
                or (name == "scaled_dot_product_attention" and key in (2, "value")))

    def check_outputs(self, output: Any) -> None:
        """A model output derived from a producer is a use no Linear compensates."""
        for leaf in pytree.tree_leaves(output):
            if isinstance(leaf, torch.Tensor):
                source = self.source_of(leaf)
                if source is not None:
                    self._block(source, "returned as a model output")

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = op_name(func)
        if name in METADATA_OPS:
            return out
        tainted: List[Tuple[Any, str]] = []
        for key, value in list(enumerate(args)) + list(kwargs.items()):
            for leaf in pytree.tree_leaves(value):
                if isinstance(leaf, torch.Tensor):
                    source = self.source_of(leaf)
                    if source is not None:
                        tainted.append((key, source))
        if not tainted:
            return out
        by_source: Dict[str, List[Any]] = collections.defaultdict(list)
        for key, source in tainted:
            by_source[source].append(key)
        passing: List[Tuple[str, Any]] = []
        for source, keys in by_source.items():
            if len(keys) > 1:
                self._block(source, f"{name} of two tensors derived from it")
            elif self._allowed(name, keys[0], args, kwargs):
                passing.append((source, keys[0]))
            else:
                self._block(source, name)
        if len(passing) > 1:  # bilinear in two producers: neither fold alone is compensated
            for source, _ in passing:
                self._block(source, f"{name} with another smoothed tensor")
        elif passing:
            source, _ = passing[0]
            if name == "linear":
                consumer = self.linear_weights[id(args[1] if len(args) > 1 else kwargs.get("weight"))]
                if consumer not in self.consumers[source]:
                    self.consumers[source].append(consumer)
            else:
                self.mark(out, source)
        return out


@dataclasses.dataclass
class TraceResult:
    """What one tracked forward found.

    Attributes:
        consumers: Producer name -> Linear names consuming its output.
        blockers: Producer name -> operations that make the fold inexact.
        calls: Module name -> number of calls in the forward.
        order: Producer names in the order they first ran.
    """

    consumers: Dict[str, List[str]]
    blockers: Dict[str, List[str]]
    calls: Dict[str, int]
    order: List[str]


class ForwardRecorder:
    """Hooks one model forward: tracks dataflow on the first call and captures its inputs.

    Use :meth:`install` before the calibration loop and :meth:`remove` after it.
    """

    def __init__(self, model: nn.Module, producers: Sequence[Producer]) -> None:
        self.model = model
        self.producers = {p.name: p for p in producers}
        modules = dict(model.named_modules())
        self.modules = modules
        linear_weights = {id(m.weight): n for n, m in modules.items() if isinstance(m, nn.Linear)}
        self.tracker = DataflowTracker(linear_weights)
        self.calls: Dict[str, int] = collections.Counter()
        self.order: List[str] = []
        self.root_calls = 0
        self.inputs: Optional[Tuple[tuple, dict]] = None
        self._active = False
        self._handles: List[Any] = []

    def install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._root_post, always_call=True))
        for name, module in self.modules.items():
            if name in self.producers or isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._make_post(name)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stop()

    def _stop(self) -> None:
        if self._active:
            self._active = False
            self.tracker.__exit__(None, None, None)

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict):
        self.root_calls += 1
        if self.root_calls == 1:
            self.inputs = (args, dict(kwargs))
            self.tracker.__enter__()
            self._active = True
        return None

    def _root_post(self, module: nn.Module, args: tuple, output: Any):
        if self.root_calls == 1 and self._active:
            self.tracker.paused = True
            try:
                self.tracker.check_outputs(output)
            finally:
                self.tracker.paused = False
            self._stop()
        return None

    def _make_post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._active:
                return
            self.tracker.paused = True
            try:
                self.calls[name] += 1
                if name in self.producers:
                    if name not in self.order:
                        self.order.append(name)
                    if isinstance(output, torch.Tensor) and output.shape[-1:] == (self.producers[name].channels,):
                        self.tracker.mark(output, name)
            finally:
                self.tracker.paused = False

        return hook

    def result(self) -> TraceResult:
        return TraceResult(dict(self.tracker.consumers), dict(self.tracker.blockers), dict(self.calls), list(self.order))


# -- the numeric probe -----------------------------------------------------------------------------------------
class _StopForward(Exception):
    pass


def probe_factors(channels: int, seed: int) -> torch.Tensor:
    """Distinct factors ``2 ** u`` with ``u`` a shuffled even grid of ``[-0.5, 0.5)`` (float64)."""
    generator = torch.Generator().manual_seed(seed)
    u = (torch.randperm(channels, generator=generator).to(torch.float64) / channels) - 0.5
    return torch.pow(2.0, u)


def _first_tensor(output: Any) -> Optional[torch.Tensor]:
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    return None


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def run_recorded(model: nn.Module, inputs: Tuple[tuple, dict], *, record_inputs: Sequence[str] = (),
                 record_io: Sequence[str] = (), scale_outputs: Optional[Dict[str, torch.Tensor]] = None,
                 replace_inputs: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """One forward of ``model`` on ``inputs`` with recording / scaling hooks.

    Args:
        record_inputs: Modules whose first input is recorded (``"in:" + name``).
        record_io: Modules whose input and output are recorded (``"io:" + name``).
        scale_outputs: Module -> per-channel factor multiplied into its output's last dimension.
        replace_inputs: Module -> tensor fed instead of its first input (after recording it).

    Returns:
        The recorded tensors by key, and ``"output"`` (the model's first floating output).
    """
    modules = dict(model.named_modules())
    recorded: Dict[str, Any] = {}
    handles = []
    scale_outputs = scale_outputs or {}
    replace_inputs = replace_inputs or {}

    def pre(name: str):
        def hook(module, args, kwargs):
            x = _input_of(args, kwargs)
            if name in record_inputs:
                recorded["in:" + name] = x.detach().clone()
            if name in record_io:
                recorded["io_in:" + name] = x.detach().clone()
            if name in replace_inputs:
                new = replace_inputs[name]
                return ((new,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": new})
            return None
        return hook

    def post(name: str):
        def hook(module, args, output):
            if name in scale_outputs:
                output = output * scale_outputs[name].to(output.device, output.dtype)
            if name in record_io:
                recorded["io_out:" + name] = output.detach().clone()
            return output
        return hook

    try:
        for name in set(record_inputs) | set(record_io) | set(replace_inputs):
            handles.append(modules[name].register_forward_pre_hook(pre(name), with_kwargs=True))
        for name in set(scale_outputs) | set(record_io):
            handles.append(modules[name].register_forward_hook(post(name)))
        args, kwargs = inputs
        with torch.no_grad():
            recorded["output"] = _first_tensor(model(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def channel_map(before: torch.Tensor, after: torch.Tensor, factors: torch.Tensor, *, tolerance: float = 1e-4
                ) -> Tuple[Optional[torch.Tensor], str]:
    """Which producer channel each consumer input channel carries, from a probe.

    Args:
        before: Consumer input without the probe, ``[..., C_in]``.
        after: The same with the producer's output channel ``j`` multiplied by ``factors[j]``.
        factors: From :func:`probe_factors`.

    Returns:
        ``(map, "")`` with ``map[c] = j`` (int64, length C_in), or ``(None, why)``
        when some channel is not a scaled copy of one producer channel.
    """
    b = before.detach().reshape(-1, before.shape[-1]).to(torch.float64).cpu()
    a = after.detach().reshape(-1, after.shape[-1]).to(torch.float64).cpu()
    energy = (b * b).sum(0)
    live = energy > 0
    ratio = torch.where(live, (a * b).sum(0) / energy.clamp_min(1e-300), torch.ones_like(energy))
    residual = ((a - ratio * b) ** 2).sum(0)
    if bool((residual[live] > (tolerance**2) * energy[live]).any()):
        return None, "an input channel of the consumer is not a per-channel multiple of the producer's output"
    if bool(((a[:, ~live]) != 0).any()):
        return None, "a consumer input channel changes where the producer's output is zero"
    log_ratio = torch.log2(ratio.clamp_min(1e-300))
    log_factors = torch.log2(factors)
    order = torch.argsort(log_factors)
    sorted_factors = log_factors[order]
    index = torch.searchsorted(sorted_factors, log_ratio).clamp(1, len(sorted_factors) - 1)
    left, right = sorted_factors[index - 1], sorted_factors[index]
    pick = torch.where((log_ratio - left).abs() <= (right - log_ratio).abs(), index - 1, index)
    mapping = order[pick]
    spacing = 1.0 / len(factors)
    if bool(((log_factors[mapping] - log_ratio).abs() > spacing / 4)[live].any()):
        return None, "a consumer input channel moved by a factor no producer channel has"
    if not bool(live.all()):
        mapping = _fill_dead(mapping, live, len(factors))
        if mapping is None:
            return None, "some consumer input channels were zero on the probe batch and their source is ambiguous"
    return mapping.to(torch.int64), ""


def _fill_dead(mapping: torch.Tensor, live: torch.Tensor, channels: int) -> Optional[torch.Tensor]:
    """Completes a map whose zero channels could not be read: identity, tiling or head repetition."""
    n = len(mapping)
    c = torch.arange(n)
    candidates = []
    if n % channels == 0:
        candidates.append(c % channels)
        groups = n // channels
        for head_dim in range(1, channels + 1):
            if channels % head_dim == 0:
                candidates.append(((c // head_dim) // groups) * head_dim + c % head_dim)
    fitting = [m for m in candidates if bool((m[live] == mapping[live]).all())]
    if not fitting or any(not torch.equal(fitting[0], m) for m in fitting[1:]):
        return None
    return fitting[0]
