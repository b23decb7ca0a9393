"""CUDA graphs inside the built-in QAT loop (``TrainConfig.cuda_graphs``).

Why: on a fast GPU a fake-quantized training step is bound by the host (see
:mod:`quantlab.qat.graphs`); replaying its forward and backward as CUDA graphs
took ResNet-18 QAT steps on an H200 from 1.17x to 1.07x FP32 and made them steady.

How the loop uses them: :class:`LoopGraphs` stands in for the model where the
loop computes its loss (``compute_loss(graphs.model, batch, task)``). A call
whose tensors have the captured batch's shapes, dtypes and strides replays the
captured forward (and, through autograd, the captured backward); any other call
(the last partial batch, another sequence length) runs the model eagerly on the
same parameters. The loss, the NaN check, gradient clipping, the optimizer and
the LR schedule stay eager. The first full batch (leading dimension = the batch
size) is captured; the capture's warm-up steps run on that batch, and what they
changed in the model (BatchNorm running statistics and counters, the folded
modules' step counters) is put back afterwards, so graphed and eager runs train
alike.

What the captured graph bakes in, and how each is handled (checked before every
replay by comparing a key of the model's Python-side state with the one at
capture; a different key re-captures on the spot, at most ``MAX_CAPTURES``
times per run, then the run stays eager):

* train/eval mode of every module (``model.train()``/``model.eval()``, e.g. an
  evaluation inside a ``progress`` callback; the loop itself evaluates only
  before and after ``train``): part of the key;
* BatchNorm freezing: ``freeze_bn_after``/:func:`~quantlab.qat.freeze_bn_stats`
  adds forward pre-hooks (hook counts are in the key) or sets a folded module's
  ``bn_frozen`` (in the key). A folded module freezes itself inside its forward
  after ``freeze_bn_after`` training forwards, which a replay does not run:
  before a replay the freeze is applied as that forward would have applied it,
  and after it the module's step counter is advanced;
* quantizer modes, recomputed/learned ranges and whether a learned range
  trains: in the key; a fixed range's cached scale is what the graph reads,
  so a fixed range changed in place (its version counter) re-captures too;
* the parameters and buffers themselves (a replaced tensor or storage, a
  changed ``requires_grad``): in the key.

In-place updates of parameters and learned ranges (the optimizer), recomputed
weight ranges and BatchNorm statistics (inside the graph) need nothing: the
graph reads and writes the same memory.

Not graphed: a model outside one CUDA device, DDP (``make_graphed_callables``
does not compose with DistributedDataParallel's hooks, and DDP also broadcasts
buffers every forward: the loop stays eager under torchrun and says so in the
run record), and a step that cannot be captured (a host sync such as
``.item()`` in the forward, an unsupported op): one log line, then eager for the
rest of the run. ``cuda_graphs="on"`` makes the first three an error before
any work; a capture failure stays a fallback in every mode.

Limits: dropout draws differ from an eager run's (the capture's warm-up draws
numbers and replays draw theirs from the graph's RNG offsets), so a run with
dropout is not bit-identical to its eager twin, nor to its own resumed run.
Python state outside the key above (e.g. a dropout probability or a module
attribute changed mid-run, a module added to the model) is not watched. The
key costs ~0.2-0.3 ms of host time per step for a prepared ResNet-18.
"""
from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from quantlab.batching import main_tensor
from quantlab.qat import ddp
from quantlab.qat.bn_fold import _FROZEN_HOOK, folded_modules
from quantlab.qat.errors import QATError
from quantlab.qat.graphs import capture
from quantlab.tensor_quantizer import QuantizerMode, TensorQuantizer

_LOG = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
#: Captures per run at most: the first, one after BatchNorm freezes, a few mode switches.
MAX_CAPTURES = 8
#: Eager forward+backward passes on the sample before each capture (lazy set-up, cuDNN choices).
WARMUP = 3


def check_mode(mode: str) -> None:
    """Raises QATError unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise QATError(f"cuda_graphs must be one of {', '.join(MODES)}, got {mode!r}")


def eager_reason(model: nn.Module, mode: str) -> Optional[str]:
    """Why the loop will run ``model`` eagerly with ``cuda_graphs=mode`` (None: it will capture).

    Raises:
        QATError: ``mode`` is ``"on"`` and graphs cannot be used (a model not on one
            CUDA device, or a run under DDP): one line, before any work.
    """
    check_mode(mode)
    if mode == "off":
        return "cuda_graphs=off"
    model = ddp.unwrap(model)
    devices = {t.device for t in model.parameters()}
    reason = None
    if not devices:
        reason = "the model has no parameters"
    elif len(devices) > 1:
        reason = f"the model is on several devices ({', '.join(sorted(str(d) for d in devices))})"
    elif next(iter(devices)).type != "cuda":
        reason = f"the model is on {next(iter(devices))}, not a CUDA device"
    elif ddp.is_distributed():
        reason = "DDP: make_graphed_callables does not compose with DistributedDataParallel's hooks"
    if reason is not None and mode == "on":
        raise QATError(f"cuda_graphs='on' cannot be honoured: {reason}; use 'auto' or 'off'")
    return reason


class _Call(nn.Module):
    """The model called with positional tensors, its keyword names fixed; returns its main tensor
    (``make_graphed_callables`` takes positional tensors, returns tensors, and refuses a module
    with hooks of its own; quantlab hangs input quantizers on hooks)."""

    def __init__(self, model: nn.Module, names: Tuple[str, ...], positional: int) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.positional = positional

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        n = self.positional
        output = self.model(*tensors[:n], **dict(zip(self.names, tensors[n:])))
        tensor = main_tensor(output)
        if tensor is None:
            raise QATError("the model's output holds no tensor to graph")
        return tensor


class _Captured:
    """One capture: the graphed callable, the call signature and the model state it baked in."""

    def __init__(self, call: nn.Module, signature: Hashable, state: Hashable) -> None:
        self.call = call
        self.signature = signature
        self.state = state


class LoopGraphs:
    """The built-in loop's model caller: replays captured steps where it can, eager elsewhere.

    Args:
        model: The model the loop trains (its ``forward`` is what gets captured).
        mode: ``"auto"``, ``"on"`` or ``"off"`` (see :class:`~quantlab.qat.loop.TrainConfig`).
        batch_size: The loader's batch size: only a full batch is captured.
        warmup: Eager passes before each capture.

    Attributes:
        model: What the loop calls: ``self`` when graphs may be used, else the model itself.
        reason: Why the run is (now) eager, or None.
    """

    def __init__(self, model: nn.Module, mode: str, *, batch_size: Optional[int], warmup: int = WARMUP) -> None:
        self.eager_model = model
        self.mode = mode
        self.reason = eager_reason(model, mode)
        self.batch_size = batch_size
        self.warmup = warmup
        self.captures = 0
        self.graphed_steps = 0
        self._captured: Optional[_Captured] = None
        self._base = ddp.unwrap(model)
        if self.reason is None:
            self._device = next(self._base.parameters()).device
            self._module_list = list(self._base.modules())
            self._quantizers = [m for m in self._module_list if isinstance(m, TensorQuantizer)]
            self._folded = [m for _, m in folded_modules(self._base)]
            # A folded module's BatchNorm gets its train flag from the folded module's forward.
            self._governed = {id(m.bn) for m in self._folded}
        elif mode == "auto":
            _LOG.info("QAT loop: eager steps, no CUDA graphs (%s)", self.reason)

    @property
    def model(self) -> Any:
        return self if self.reason is None else self.eager_model

    def report(self, steps: int) -> Dict[str, Any]:
        """What the run did, for the run record (``run.json``) and the CLI.

        Args:
            steps: Training steps this call of the loop ran (one model call each).
        """
        return {"requested": self.mode, "used": self.graphed_steps > 0, "graphed_steps": self.graphed_steps,
                "eager_steps": max(0, steps - self.graphed_steps), "captures": self.captures, "eager_reason": self.reason}

    # -- the call the loop makes ---------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.reason is not None:
            return self.eager_model(*args, **kwargs)
        tensors, signature = self._signature(args, kwargs)
        if signature is None:
            return self._eager(args, kwargs)
        self._freeze_folded_due()
        state = self._state()
        captured = self._captured
        if captured is not None and captured.state != state:
            _LOG.info("QAT loop: the model changed since its CUDA graphs were captured (train/eval mode, BatchNorm "
                      "freezing, quantizer modes or parameters): capturing again")
            self.close()
            captured = None
        if captured is None:
            if not self._is_full_batch(tensors):
                return self._eager(args, kwargs)
            captured = self._capture(tensors, signature, len(args))
            if captured is None:
                return self._eager(args, kwargs)
        if captured.signature != signature:
            return self._eager(args, kwargs)
        output = captured.call(*tensors)
        for module in self._folded:  # what the replayed forward did not do in Python
            if module.training:
                module.train_steps += 1
        self.graphed_steps += 1
        return output

    def close(self) -> None:
        """Frees the captured graphs and their memory pool now (the loop calls it when it ends).

        A capture's objects (``make_graphed_callables``' autograd Function and closures) form
        reference cycles, which only a garbage collection frees: without one, a dropped capture's
        memory pool (the step's activations) would stay allocated until Python happens to collect.
        """
        if self._captured is not None:
            self._captured = None
            gc.collect()

    def _eager(self, args: tuple, kwargs: dict) -> Any:
        return self.eager_model(*args, **kwargs)

    # -- signature and state -------------------------------------------------------------------
    def _signature(self, args: tuple, kwargs: dict) -> Tuple[List[torch.Tensor], Optional[Hashable]]:
        """The call's tensors (positional first, then keywords) and a key of their layout; the key
        is None when the call cannot be replayed (a non-tensor argument, another device, an input
        that requires grad)."""
        names = tuple(kwargs)
        tensors = list(args) + [kwargs[k] for k in names]
        key: List[Hashable] = [len(args), names]
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device != self._device or t.requires_grad:
                return tensors, None
            key.append((tuple(t.shape), t.dtype, t.stride()))
        return tensors, tuple(key)

    def _is_full_batch(self, tensors: Sequence[torch.Tensor]) -> bool:
        first = tensors[0] if tensors else None
        return first is not None and first.dim() > 0 and (self.batch_size is None or first.shape[0] == self.batch_size)

    def _freeze_folded_due(self) -> None:
        """Applies the freeze a folded module's own forward would apply in this step (it runs on replay
        too, where its Python does not): frozen from training forward ``freeze_bn_after + 1`` on."""
        for m in self._folded:
            if m.training and not m.bn_frozen and m.freeze_bn_after is not None and m.train_steps + 1 > m.freeze_bn_after:
                m.bn_frozen = True

    def _state(self) -> Hashable:
        """A key of everything on the Python side that a capture bakes in (see the module docstring).

        Built before every replay (about 0.2 ms for a prepared ResNet-18), so as flat comprehensions.
        """
        governed = self._governed
        modules = self._module_list
        # A train flag that the module's forward sets itself (a folded module's BatchNorm, a frozen
        # BatchNorm's pre-hook) says nothing about the next forward between steps: left out.
        flags = [(m.training if id(m) not in governed and _FROZEN_HOOK not in m.__dict__ else None,
                  len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
        params = [(id(p), p.data_ptr(), p.requires_grad) for m in modules for p in m._parameters.values() if p is not None]
        buffers = [(id(b), b.data_ptr()) for m in modules for b in m._buffers.values() if b is not None]
        quantizers = [_quantizer_key(m) for m in self._quantizers]
        return (tuple(flags), tuple(params), tuple(buffers), tuple(quantizers), tuple(m.bn_frozen for m in self._folded))

    # -- capture -------------------------------------------------------------------------------
    def _capture(self, tensors: Sequence[torch.Tensor], signature: Hashable, positional: int) -> Optional[_Captured]:
        if self.captures >= MAX_CAPTURES:
            self._give_up(f"{MAX_CAPTURES} captures used up: the model kept changing between steps")
            return None
        self.captures += 1
        names = signature[1]
        sample = tuple(t.detach().clone() for t in tensors)  # the graph's own input buffers
        try:
            with _model_state_kept(self._base, self._folded):
                call = capture(_Call(self._base, names, positional), sample, self._device, warmup=self.warmup,
                               allow_unused=True)
        except Exception as exc:  # noqa: BLE001 - any capture failure: eager steps, never a crash
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._give_up(f"capture failed: {type(exc).__name__}: {first[:300]}")
            return None
        # The state after the capture: the one the replays will see (the capture's forwards ran the
        # model's Python once more, e.g. a frozen BatchNorm's pre-hook).
        self._captured = _Captured(call, signature, self._state())
        return self._captured

    def _give_up(self, reason: str) -> None:
        self.reason = reason
        self._captured = None
        gc.collect()  # also what a failed capture left in reference cycles (its memory pool)
        _LOG.warning("QAT loop: CUDA graphs not used from here on (%s); eager steps instead (%d steps were graphed)",
                     reason, self.graphed_steps)


def _quantizer_key(q: TensorQuantizer) -> Hashable:
    amax = q.amax
    learned = bool(getattr(q, "learn_amax", False)) and amax.requires_grad
    recompute = bool(getattr(q, "recompute_amax", False))
    # A fixed range is read through its cached scale (TensorQuantizer.fixed_scale): the graph holds
    # that scale tensor, so an amax changed in place (a new version) must re-capture.
    fixed = q._mode is QuantizerMode.QUANTIZE and not learned and not recompute
    return (q._mode, recompute, learned, id(amax), amax._version if fixed else None)


@contextlib.contextmanager
def _model_state_kept(model: nn.Module, folded: Sequence[nn.Module]) -> Iterator[None]:
    """Puts back what a capture's warm-up and captured forward changed in the model.

    Buffers (BatchNorm statistics and counters) are copied back in place (the graph
    keeps their memory); quantizers' buffers are left alone (a copy would bump a
    fixed range's version and drop the cached scale the graph reads; their forward
    only recomputes a weight range from the unchanged weights). A folded module's
    step counter and frozen flag are put back, and it does not freeze itself during
    the capture (its live-statistics forward is what the step before the freeze runs).
    """
    quantizer_buffers = {id(b) for m in model.modules() if isinstance(m, TensorQuantizer) for b in m.buffers(recurse=False)}
    saved = [(b, b.detach().clone()) for b in model.buffers() if id(b) not in quantizer_buffers]
    counters = [(m, m.train_steps, m.bn_frozen, m.freeze_bn_after) for m in folded]
    for m in folded:
        m.freeze_bn_after = None
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for m, steps, frozen, after in counters:
            m.train_steps, m.bn_frozen, m.freeze_bn_after = steps, frozen, after


__all__ = ["MODES", "MAX_CAPTURES", "LoopGraphs", "check_mode", "eager_reason"]
