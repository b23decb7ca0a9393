"""Pruning to 2:4 along the input dimension: magnitude, or SparseGPT's one-shot second-order method.

* ``magnitude``: keep the 2 largest ``|w|`` of every 4 input weights. No data.
* ``sparsegpt`` (Frantar & Alistarh, 2023): per Linear layer, from the Hessian
  ``H = 2 X^T X`` of its calibration inputs, choose the 2 of every 4 weights whose
  removal costs least (``w^2 / [H^-1]_jj^2``) and update the remaining weights of
  the row to compensate (the optimal brain surgeon update, column by column in
  blocks). Conv layers selected with ``sparsegpt`` are pruned by magnitude
  (the report says so). ``sequential=True`` re-collects each layer's inputs from
  the model pruned so far (closer to the paper's block-by-block pass; one
  calibration pass per layer); the default collects every layer's inputs in one
  pass over the dense model.

The result is a mask per layer, registered before any weight quantizer
(:mod:`quantlab.sparsity.mask`), and the stored weights zeroed where it is.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from quantlab.sparsity.errors import SparsityError
from quantlab.sparsity.mask import attach_mask, iter_masks
from quantlab.sparsity.pattern import M, N, PATTERN, Target, is_2to4, mask_2to4, select_layers

METHODS = ("magnitude", "sparsegpt")


@dataclasses.dataclass
class LayerPruning:
    """What pruning did to one layer.

    Attributes:
        name: Module name.
        shape: Weight shape.
        method: ``magnitude`` or ``sparsegpt`` (a conv under ``sparsegpt`` says ``magnitude``).
        kept: Fraction of weights kept (0.5 for 2:4, less if zeros were already there).
        relative_change: ``||W_pruned - W|| / ||W||``.
    """

    name: str
    shape: Tuple[int, ...]
    method: str
    kept: float
    relative_change: float


@dataclasses.dataclass
class PruneReport:
    """Every pruned layer, the layers skipped (with why) and the time taken."""

    method: str
    pattern: str
    layers: List[LayerPruning]
    skipped: List[Tuple[str, str]]
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        return {
            "method": self.method, "pattern": self.pattern, "seconds": self.seconds,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "skipped": [{"layer": n, "reason": r} for n, r in self.skipped],
        }


def prune(
    model: nn.Module,
    method: str = "magnitude",
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    data: Optional[Iterable[Any]] = None,
    max_batches: Optional[int] = None,
    strict: bool = False,
    sequential: bool = False,
    block_size: int = 128,
    damping: float = 0.01,
    progress: Optional[Callable[[int, int], None]] = None,
) -> PruneReport:
    """Prunes the selected layers of ``model`` to 2:4 along their input dimension, in place.

    Args:
        model: Any model (with or without quantizers attached).
        method: ``"magnitude"`` or ``"sparsegpt"``.
        include / exclude: fnmatch patterns of module names (see :func:`select_layers`).
        data: Calibration batches (``sparsegpt`` only), in any form the model takes.
        max_batches: Use at most this many batches.
        strict: Also fail on layers a wildcard matched that cannot be 2:4.
        sequential: ``sparsegpt``: collect each layer's inputs from the model pruned so far.
        block_size: ``sparsegpt`` column block (a multiple of 4).
        damping: ``sparsegpt`` damping, as a fraction of the mean Hessian diagonal.
        progress: ``progress(done, total)`` per pruned layer.

    Raises:
        SparsityError: unknown method, no data for ``sparsegpt``, or a selection problem.
    """
    if method not in METHODS:
        raise SparsityError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "sparsegpt" and data is None:
        raise SparsityError("sparsegpt needs calibration data (data=...): its weight update uses the layers' inputs")
    if block_size <= 0 or block_size % M:
        raise SparsityError(f"block_size must be a positive multiple of {M}, got {block_size}")
    if not (damping > 0 and math.isfinite(damping)):
        raise SparsityError(f"damping must be a positive number, got {damping}")
    start = time.perf_counter()
    selection = select_layers(model, include, exclude, strict=strict)
    targets = selection.targets
    batches = _take(data, max_batches) if data is not None else []
    if method == "sparsegpt" and not batches:
        raise SparsityError("sparsegpt got empty calibration data")
    hessians: Dict[str, Tuple[torch.Tensor, int]] = {}
    linear = [t for t in targets if isinstance(t.module, nn.Linear) or t.axis == 0]
    if method == "sparsegpt" and not sequential:
        hessians = collect_hessians(model, linear, batches)
    layers: List[LayerPruning] = []
    for index, target in enumerate(targets):
        weight = target.weight
        before = weight.detach().to(torch.float32).clone()
        used = "magnitude"
        if method == "sparsegpt" and target in linear:
            if sequential:
                hessians = collect_hessians(model, [target], batches)
            h, count = hessians[target.name]
            if count == 0:
                raise SparsityError(f"layer '{target.name}' saw no input during the calibration pass: is it used in forward?")
            new_weight, mask = sparsegpt_2to4(_as_rows(before, target.axis), h, block_size=block_size, damping=damping)
            new_weight, mask = _from_rows(new_weight, target.axis), _from_rows(mask, target.axis)
            with torch.no_grad():
                weight.copy_(new_weight.to(weight.dtype))
            used = "sparsegpt"
        else:
            mask = mask_2to4(before, target.axis)
        attach_mask(target.module, mask, weight_name=target.weight_name, axis=target.axis)
        after = target.weight.detach().to(torch.float32)
        norm = float(before.norm()) or 1.0
        layers.append(LayerPruning(target.name, tuple(before.shape), used, float((after != 0).float().mean()),
                                   float((after - before).norm()) / norm))
        if progress is not None:
            progress(index + 1, len(targets))
    return PruneReport(method, PATTERN, layers, list(selection.skipped), time.perf_counter() - start)


def masks_from_weights(model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> List[str]:
    """Adopts the zeros of already-2:4 weights as masks (e.g. after loading a pruned checkpoint).

    Returns:
        Names of the layers given a mask.

    Raises:
        SparsityError: a selected layer is not 2:4 (names it and how many groups break the pattern).
    """
    from quantlab.sparsity.pattern import group_violations

    selection = select_layers(model, include, exclude)
    problems, adopted = [], []
    for target in selection.targets:
        weight = target.weight.detach()
        if not is_2to4(weight, target.axis):
            bad, total = group_violations(weight, target.axis)
            problems.append(f"'{target.name}' ({bad} of {total} groups of {M} hold more than {N} non-zeros)")
            continue
        attach_mask(target.module, weight != 0, weight_name=target.weight_name, axis=target.axis)
        adopted.append(target.name)
    if problems:
        raise SparsityError(f"these layers are not {PATTERN} along the input dimension: " + ", ".join(problems)
                            + "; prune them (quantlab.sparsity.prune) or exclude them")
    return adopted


def _take(data: Optional[Iterable[Any]], n: Optional[int]) -> List[Any]:
    out: List[Any] = []
    for batch in data or []:
        if n is not None and len(out) >= n:
            break
        out.append(batch)
    return out


def _as_rows(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """``[out, in]`` rows (input dimension last) of a Linear-like weight."""
    return weight if axis == 1 else weight.t()


def _from_rows(rows: torch.Tensor, axis: int) -> torch.Tensor:
    return rows if axis == 1 else rows.t()


def collect_hessians(model: nn.Module, targets: Sequence[Target], batches: Sequence[Any]) -> Dict[str, Tuple[torch.Tensor, int]]:
    """``(sum of x^T x over calibration rows, row count)`` of each target's input, in float64.

    Runs the calibration batches once with quantization off (the float inputs),
    the model in eval mode (put back as it was).
    """
    from quantlab.attach import quantization_disabled
    from quantlab.batching import call_model, model_device, split_batch, to_device

    sums: Dict[str, List[Any]] = {}
    handles = []

    def hook_for(target: Target):
        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            entry = sums.setdefault(target.name, [torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device), 0])
            entry[0].addmm_(rows.t(), rows)
            entry[1] += rows.shape[0]

        return hook

    for target in targets:
        handles.append(target.module.register_forward_pre_hook(hook_for(target), with_kwargs=True))
    device = model_device(model)
    training = [m for m in model.modules() if m.training]
    model.eval()
    try:
        with torch.no_grad(), quantization_disabled(model):
            for batch in batches:
                inputs, _ = split_batch(batch)
                call_model(model, to_device(inputs, device))
    finally:
        for handle in handles:
            handle.remove()
        for m in training:
            m.training = True
    return {t.name: (sums[t.name][0], sums[t.name][1]) if t.name in sums else (torch.zeros(1, 1, dtype=torch.float64), 0) for t in targets}


def sparsegpt_2to4(weight: torch.Tensor, xtx: torch.Tensor, *, block_size: int = 128, damping: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT for one ``[out, in]`` weight with ``xtx = sum x^T x`` of its inputs: ``(new weight, mask)``.

    Computed in float64 (small layers; the Cholesky factorization of H needs the range).
    """
    w = weight.detach().to(torch.float64).clone()
    h = 2.0 * xtx.to(device=w.device, dtype=torch.float64)
    columns = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    diag = torch.arange(columns, device=w.device)
    h[diag, diag] += damping * torch.mean(torch.diag(h))
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as exc:  # not positive definite even after damping
        raise SparsityError(f"sparsegpt: the input Hessian of a {tuple(weight.shape)} layer is singular ({exc}); raise damping") from None
    mask = torch.zeros_like(w, dtype=torch.bool)  # True = pruned
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            if i % M == 0:
                cost = w1[:, i:i + M] ** 2 / torch.diag(hinv1)[i:i + M].reshape(1, -1) ** 2
                mask[:, i1 + i:i1 + i + M].scatter_(1, torch.topk(cost, N, dim=1, largest=False).indices, True)
            q = col.clone()
            q[mask[:, i1 + i]] = 0.0
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    keep = ~mask
    return (w * keep).to(weight.dtype), keep


def pruned_layers(model: nn.Module) -> List[str]:
    """Names of the layers holding a 2:4 mask."""
    return [ref.module_name for ref in iter_masks(model)]


__all__ = ["LayerPruning", "METHODS", "PruneReport", "collect_hessians", "masks_from_weights", "prune", "pruned_layers", "sparsegpt_2to4"]
