"""Does the data fit the model? Two samples through the model before any pass, errors in words.

A CSV with 10 columns for a model whose first layer takes 784 features fails
deep in a pass as ``mat1 and mat2 shapes cannot be multiplied (64x10 and
784x128)``. :func:`check_model_fits` runs the first two samples first and, if
the model fails, names the data spec, the samples, the input shape, the layer
that failed and what that layer takes.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional, Tuple

import torch
from torch import nn

from quantlab.data.errors import DataShapeError


def _head(value: Any, n: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:n] if value.dim() > 0 else value
    if isinstance(value, dict):
        return {k: _head(v, n) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_head(v, n) for v in value)
    return value


def _shapes(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shapes(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in value) + ")"
    return type(value).__name__


def takes(module: nn.Module) -> str:
    """What a layer takes, in words ("inputs of shape (N, 784)")."""
    if isinstance(module, nn.Linear):
        return f"inputs whose last dimension is {module.in_features}"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nd = len(module.kernel_size)
        spatial = ", ".join("H W D".split()[:nd]) if nd > 1 else "L"
        return f"inputs of shape (N, {module.in_channels}, {spatial}) ({nd + 2} dimensions, {module.in_channels} channels)"
    if isinstance(module, nn.Embedding):
        return f"integer token ids below {module.num_embeddings}"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return f"{module.num_features} channels on dimension 1"
    if isinstance(module, nn.LayerNorm):
        return f"inputs ending in {tuple(module.normalized_shape)}"
    return ""


def check_model_fits(model: nn.Module, data: Iterable[Any], label: str, *, samples: int = 2) -> None:
    """Runs the first ``samples`` samples of ``data`` through ``model`` (no grad, modes kept).

    Raises:
        DataShapeError: the model fails on them; names the spec, the input shape,
            the failing layer and what it takes. Errors that are not about the data
            (quantlab's own) pass through.
    """
    from quantlab.batching import call_model, model_device, split_batch, to_device
    from quantlab.errors import QuantlabError

    try:
        batch = next(iter(data))
    except StopIteration:
        return  # empty data is reported by whoever needs data
    inputs, _ = split_batch(_head(batch, samples))
    trail: List[Tuple[str, nn.Module, Any]] = []

    def enter(name: str):
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            trail.append((name, module, args[0] if args else None))

        return hook

    finished: List[str] = []

    def leave(name: str):
        def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
            finished.append(name)

        return hook

    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    handles = [m.register_forward_pre_hook(enter(n)) for n, m in leaves] + [m.register_forward_hook(leave(n)) for n, m in leaves]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # BatchNorm in train mode would update its statistics from these two samples
        with torch.no_grad():
            call_model(model, to_device(inputs, model_device(model)))
    except (QuantlabError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, put in terms of the data
        where = ""
        if trail and (not finished or finished[-1] != trail[-1][0]):
            name, module, value = trail[-1]
            expected = takes(module)
            got = _shapes(value) if value is not None else "?"
            where = f"; layer '{name}' ({type(module).__name__}) received {got}" + (f" but takes {expected}" if expected else "")
        elif finished:
            where = f"; it failed after layer '{finished[-1]}', outside any layer"
        reason = " ".join(str(exc).split())[:240]
        raise DataShapeError(
            f"{label} does not fit the model: its samples 0-{samples - 1} have inputs {_shapes(inputs)}{where} "
            f"({type(exc).__name__}: {reason})"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


__all__ = ["check_model_fits", "takes"]
