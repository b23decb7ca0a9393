"""The samples AdaRound reconstructs a layer on: the layer's inputs in the quantized
model (the earlier layers already rounded) and its outputs in the FP32 model, at most
``max_samples`` of each, from calibration passes that stop right after the layer.

Why not one pass per layer for both: on a CPU these passes cost as much as the
optimization (a pass to a late layer is nearly a whole forward over every cached
sample). The FP32 outputs do not depend on any rounding, so one FP32 pass caches those
of several consecutive layers, as many as ``cache_bytes`` hold (the first layers, with
large activations, get a pass each). The quantized inputs depend on the rounding of
every earlier layer: they need a pass per layer, after the earlier ones are rounded.

Pairing an output cached in one pass with an input taken in a later pass is right only
if the forward loop gives the same batches every time (not a shuffling loader, not
random augmentation): every pass fingerprints each batch it runs, and when a layer's
batches differ from the cached ones, that layer and every later one take their FP32
outputs and quantized inputs from the same batch in one pass each (the former way).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from quantlab.algorithms._layers import (
    EnoughSamples,
    QuantizedLayer,
    StopForward,
    call_stopping,
    first_input,
    fp32_reference,
    hooks,
    main_output,
    run_pass,
)
from quantlab.algorithms.base import AlgorithmContext, AlgorithmError

Pair = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def output_bytes(output: Any) -> int:
    """Bytes one sample of a layer's output takes as a float32 target (0 if it is not a tensor)."""
    out = main_output(output)
    if out is None:
        return 0
    return 4 * (out.numel() // max(1, out.shape[0])) if out.dim() else 4


class LayerData:
    """Hands out each layer's ``(inputs, targets)``; call :meth:`take` in the order the layers run.

    Args:
        model: The quantized model.
        layers: Every quantized layer (the FP32 model swaps in their reference weights).
        order: The layers to be taken, in the order the network runs them.
        reference: The FP32 reference weights (``reference_of``).
        context: The algorithm's context (its forward loop).
        max_samples: Samples per layer.
        sample_bytes: Per layer name, bytes of one sample of its output (:func:`output_bytes`).
        cache_bytes: At most this many bytes of FP32 outputs cached ahead of their layer.
        name: The algorithm's name, for errors.
    """

    def __init__(self, model: nn.Module, layers: Sequence[QuantizedLayer], order: Sequence[QuantizedLayer],
                 reference: Mapping[str, torch.Tensor], context: AlgorithmContext, max_samples: int,
                 sample_bytes: Mapping[str, int], cache_bytes: int, name: str) -> None:
        self.model, self.layers, self.order = model, list(layers), list(order)
        self.reference, self.context, self.max_samples = reference, context, max_samples
        self.sample_bytes, self.cache_bytes, self.name = dict(sample_bytes), cache_bytes, name
        self.cached: Dict[str, List[torch.Tensor]] = {}  # layer name -> its FP32 outputs, per batch
        self.bad: Set[str] = set()  # layers whose FP32 output is not a single tensor
        self.prints: List[Tuple[Any, ...]] = []  # the cached pass's batch fingerprints
        self.paired_only = False  # the forward loop's batches changed between passes
        self.fp32_passes = 0
        self.quantized_passes = 0

    def take(self, layer: QuantizedLayer) -> Pair:
        """The layer's quantized-model inputs and FP32-model outputs (None, None: not single tensors).

        Raises:
            AlgorithmError: NaN or Inf in them (naming the layer).
        """
        if not self.paired_only and layer.name not in self.cached and layer.name not in self.bad:
            window = self._window(layer)
            if len(window) > 1:
                self._cache_fp32(window)
        if layer.name in self.bad:
            self.bad.discard(layer.name)
            return None, None
        if layer.name in self.cached:
            pair = self._with_cached(layer, self.cached.pop(layer.name))
        else:
            pair = self._paired(layer)
        x, y = pair
        if x is not None and y is not None and (not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(y).all())):
            raise AlgorithmError(f"{self.name}: NaN or Inf in the inputs or FP32 outputs of layer '{layer.name}'")
        return pair

    def _window(self, layer: QuantizedLayer) -> List[QuantizedLayer]:
        """``layer`` and the layers after it whose FP32 outputs fit in the cache together."""
        start = next(i for i, l in enumerate(self.order) if l is layer)
        window: List[QuantizedLayer] = []
        total = 0
        for candidate in self.order[start:]:
            size = self.sample_bytes.get(candidate.name, 0) * self.max_samples
            if size <= 0 or (window and total + size > self.cache_bytes):
                break
            window.append(candidate)
            total += size
        return window or [layer]

    def _cache_fp32(self, window: List[QuantizedLayer]) -> None:
        """One FP32 pass that stops after the window's last layer: its layers' outputs, per batch."""
        outputs: Dict[str, List[torch.Tensor]] = {l.name: [] for l in window}
        counts = {l.name: 0 for l in window}
        bad: Set[str] = set()
        last = window[-1]
        self.prints = []

        def on_fp32(hooked: QuantizedLayer, args: Tuple[Any, ...], output: Any) -> None:
            out, x = main_output(output), first_input(args)
            if out is None:
                bad.add(hooked.name)
            else:
                outputs[hooked.name].append(out.detach().float().clone())
            counts[hooked.name] += x.shape[0] if x is not None and x.dim() else 1
            if hooked is last:
                raise StopForward

        def step(run_model: Callable[[], Any]) -> None:
            with fp32_reference(self.model, self.layers, self.reference), hooks(window, on_fp32), \
                    _fingerprints(self.model, self.prints):
                call_stopping(run_model)
            if all(counts[name] >= self.max_samples for name in counts if name not in bad):
                raise EnoughSamples

        self.fp32_passes += 1
        run_pass(self.model, self.context, step)
        self.bad |= bad
        self.cached.update({name: out for name, out in outputs.items() if name not in bad})

    def _with_cached(self, layer: QuantizedLayer, targets: List[torch.Tensor]) -> Pair:
        """One quantized pass for the inputs, paired with the cached FP32 outputs of the same batches."""
        inputs: List[torch.Tensor] = []
        prints: List[Tuple[Any, ...]] = []
        bad = self._quantized_pass(layer, inputs, prints)
        if bad or not inputs:
            return None, None
        n = len(inputs)
        if n > len(targets) or not _same(prints, self.prints[:n]):
            self.paired_only = True  # the loop's batches change from pass to pass: pair within one batch
            self.cached.clear()
            return self._paired(layer)
        return torch.cat(inputs)[:self.max_samples], torch.cat(targets[:n])[:self.max_samples]

    def _quantized_pass(self, layer: QuantizedLayer, inputs: List[torch.Tensor], prints: List[Tuple[Any, ...]]) -> bool:
        count = [0]
        bad = [False]

        on_quant = _input_recorder(inputs, count, bad)

        def step(run_model: Callable[[], Any]) -> None:
            with hooks([layer], on_quant), _fingerprints(self.model, prints):
                call_stopping(run_model)
            if bad[0] or count[0] >= self.max_samples:
                raise EnoughSamples

        self.quantized_passes += 1
        run_pass(self.model, self.context, step)
        return bad[0]

    def _paired(self, layer: QuantizedLayer) -> Pair:
        """One pass, each batch run through the FP32 model then the quantized one (up to the layer)."""
        inputs: List[torch.Tensor] = []
        targets: List[torch.Tensor] = []
        count = [0]
        bad = [False]

        def on_fp32(hooked: QuantizedLayer, args: Tuple[Any, ...], output: Any) -> None:
            out = main_output(output)
            if out is None:
                bad[0] = True
            else:
                targets.append(out.detach().float().clone())
            raise StopForward

        on_quant = _input_recorder(inputs, count, bad)

        def step(run_model: Callable[[], Any]) -> None:
            with fp32_reference(self.model, self.layers, self.reference), hooks([layer], on_fp32):
                call_stopping(run_model)
            with hooks([layer], on_quant):
                call_stopping(run_model)
            if bad[0] or count[0] >= self.max_samples:
                raise EnoughSamples

        self.fp32_passes += 1
        self.quantized_passes += 1
        run_pass(self.model, self.context, step)
        if bad[0] or not inputs or len(inputs) != len(targets):
            return None, None
        return torch.cat(inputs)[:self.max_samples], torch.cat(targets)[:self.max_samples]


@contextlib.contextmanager
def _fingerprints(model: nn.Module, out: List[Tuple[Any, ...]]) -> Iterator[None]:
    """Appends a fingerprint of each batch ``model`` is called on: its first tensor's shape,
    dtype, sum and sum of magnitudes (device values, compared in one read-back)."""

    def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not tensors:
            out.append(("no tensor",))
            return
        t = tensors[0].detach()
        values = t.float()
        out.append((tuple(t.shape), t.dtype, torch.stack([values.sum(), values.abs().sum()])))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _same(a: Sequence[Tuple[Any, ...]], b: Sequence[Tuple[Any, ...]]) -> bool:
    """Whether two passes ran the same batches (by :func:`_fingerprints`)."""
    if len(a) != len(b) or any(len(x) != 3 or len(y) != 3 or x[:2] != y[:2] for x, y in zip(a, b)):
        return False
    if not a:
        return True
    return torch.equal(torch.stack([x[2] for x in a]), torch.stack([y[2] for y in b]))


def _input_recorder(inputs: List[torch.Tensor], count: List[int], bad: List[bool]
                    ) -> Callable[[QuantizedLayer, Tuple[Any, ...], Any], None]:
    """A hook that keeps the layer's single input (counting its samples) and stops the forward there;
    ``bad[0]`` is set where the input is not one tensor."""

    def on_quant(hooked: QuantizedLayer, args: Tuple[Any, ...], output: Any) -> None:
        x = first_input(args)
        if x is None or len(args) > 1:
            bad[0] = True
        else:
            inputs.append(x.detach().clone())
            count[0] += x.shape[0] if x.dim() else 1
        raise StopForward

    return on_quant
