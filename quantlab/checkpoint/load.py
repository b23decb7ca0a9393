"""Loading checkpoints: the FP32 model from its factory -> the transforms' structure -> the weights -> the scales."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from quantlab.algorithms.base import AlgorithmContext, AlgorithmError, Stage, get_algorithm, list_algorithms
from quantlab.attach import is_quantized
from quantlab.checkpoint.format import CheckpointInfo, CheckpointMismatchError, read_checkpoint
from quantlab.pipeline.apply import apply_scales
from quantlab.scales import Scales

PathLike = Union[str, Path]


def rebuild_structure(model: nn.Module, transforms: Sequence[Dict[str, Any]], config: Any = None) -> List[str]:
    """Redoes, without data, the structural changes of the recorded transforms on the FP32 ``model``.

    Each transform's ``rebuild(model, details)`` hook runs if it has one; a data-free
    transform without one is run again (the checkpoint's weights replace what it
    computes); a transform that needs data and has no hook changed weights only.

    Returns:
        What was done per transform (``"cle: re-run"``), for messages.

    Raises:
        AlgorithmError: a recorded transform is not registered in this quantlab.
    """
    done = []
    for report in transforms:
        try:
            algorithm = get_algorithm(report["name"])
        except AlgorithmError:
            raise AlgorithmError(f"the checkpoint needs algorithm {report['name']!r}, which this quantlab does not have "
                                 f"(known algorithms: {', '.join(list_algorithms()) or 'none'})") from None
        if algorithm.stage is not Stage.TRANSFORM:
            raise AlgorithmError(f"the checkpoint lists {algorithm.name!r} as a transform, but it is a {algorithm.stage.value} algorithm here")
        if algorithm.rebuild is not None:
            algorithm.rebuild(model, dict(report.get("details") or {}))
            done.append(f"{algorithm.name}: rebuilt")
        elif not algorithm.needs_data:
            params = config.params_of(algorithm.name) if config is not None else {}
            algorithm.run(model, AlgorithmContext(forward_loop=None, params=params, config=config))
            done.append(f"{algorithm.name}: re-run")
        else:
            done.append(f"{algorithm.name}: weights only")
    return done


def _add_refiner_biases(model: nn.Module, tensors: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> List[str]:
    """Bias parameters a refiner (bias correction) gave layers that had none: created so the load is strict."""
    added = []
    modules = dict(model.named_modules())
    for key, tensor in tensors.items():
        if key in expected or not key.endswith("bias"):
            continue
        module_name, _, attr = key.rpartition(".")
        module = modules.get(module_name)
        weight = getattr(module, "weight", None) if module is not None else None
        if attr != "bias" or module is None or getattr(module, "bias", 0) is not None or not isinstance(weight, torch.Tensor):
            continue
        if tensor.dim() != 1 or tensor.numel() not in (weight.shape[0], weight.shape[1] * getattr(module, "groups", 1)):
            continue  # reported as unexpected below
        module.bias = nn.Parameter(torch.zeros(tensor.shape, dtype=weight.dtype, device=weight.device))
        expected[key] = module.bias
        added.append(module_name)
    return added


def _problems(expected: Dict[str, torch.Tensor], tensors: Dict[str, torch.Tensor]) -> List[str]:
    problems = [f"'{k}' is in the model but not in the checkpoint" for k in expected if k not in tensors]
    problems += [f"'{k}' is in the checkpoint but not in the model" for k in tensors if k not in expected]
    for key, tensor in tensors.items():
        want = expected.get(key)
        if want is None:
            continue
        if tuple(want.shape) != tuple(tensor.shape):
            problems.append(f"'{key}': the checkpoint holds shape {tuple(tensor.shape)}, the model needs {tuple(want.shape)}")
        elif want.dtype != tensor.dtype:
            problems.append(f"'{key}': the checkpoint holds {tensor.dtype}, the model needs {want.dtype}")
    return problems


def _tied_conflicts(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> List[str]:
    """Names the model ties into one parameter (an LM head tied to its embedding) whose checkpoint tensors differ.

    ``load_state_dict`` copies each of them into the one parameter in turn, so the last wins
    silently: a checkpoint saved after an untie (SmoothQuant's ``untie``) whose record of it is
    gone would load lm_head's weight into the embedding too.
    """
    groups: Dict[int, List[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    problems = []
    for names in groups.values():
        present = sorted(n for n in names if n in tensors)
        first = present[0] if present else None
        for other in present[1:]:
            a, b = tensors[first], tensors[other]
            if a.shape == b.shape and a.dtype == b.dtype and not torch.equal(a, b):
                problems.append(f"'{first}' and '{other}' are one tied parameter in the model but differ in the checkpoint "
                                "(saved after an untie whose record is missing?)")
    return problems


def paired_scales(info: CheckpointInfo, scales: Optional[Union[PathLike, Scales]] = None) -> Scales:
    """The scales of a checkpoint: ``scales`` if given, else the file it names beside it (its SHA-256 checked).

    Raises:
        CheckpointMismatchError: the file is missing or not the one the checkpoint was written with.
    """
    if isinstance(scales, Scales):
        return scales
    if scales is not None:
        return Scales.load(scales)
    if not info.scales:
        raise CheckpointMismatchError(f"{info.path} names no scales file: give the scales file too")
    path = info.path.parent / info.scales
    if not path.is_file():
        raise CheckpointMismatchError(f"{info.path} pairs with {path}, which is missing: give the scales file")
    if info.scales_sha256 and hashlib.sha256(path.read_bytes()).hexdigest() != info.scales_sha256:
        raise CheckpointMismatchError(f"{path} is not the scales file {info.path} was written with (its SHA-256 differs): "
                                      "the pair was mixed up or one of them changed")
    return Scales.load(path)


def load_checkpoint(model: nn.Module, path: PathLike, *, scales: Optional[Union[PathLike, Scales]] = None,
                    with_scales: bool = True) -> nn.Module:
    """Rebuilds the quantized model of a checkpoint on the FP32 ``model`` its factory made, in place.

    Args:
        model: The FP32 model (no quantizers), as the model factory builds it.
        path: The ``model.<calibrator>.safetensors`` checkpoint.
        scales: The scales to load (default: the file the checkpoint names, beside it,
            checked against its recorded SHA-256); e.g. a mixed-precision file made from it.
        with_scales: False: stop after the weights (a floating-point transformed model).

    Returns:
        ``model``, transformed, with the checkpoint's weights, fake-quantizing with the scales.

    Raises:
        CheckpointFormatError: the file is corrupt, truncated, altered or holds NaN/Inf.
        CheckpointMismatchError: names, shapes or dtypes do not fit the model (all listed),
            or the scales file is missing or not the one the checkpoint was written with.
        AlgorithmError: the checkpoint needs an algorithm this quantlab does not have.
        ScalesFormatError / ScalesMismatchError: from the scales file.
    """
    if is_quantized(model):
        raise CheckpointMismatchError(f"load_checkpoint needs the FP32 model from its factory, but {type(model).__name__} already has quantizers")
    info, tensors = read_checkpoint(path)
    loaded_scales = paired_scales(info, scales) if with_scales else None  # a missing/altered pair fails before the model changes
    try:
        rebuild_structure(model, info.transforms, info.config)
    except AlgorithmError as exc:  # named with the file it came from
        raise AlgorithmError(f"{path}: {exc}") from None
    expected = dict(model.state_dict())
    _add_refiner_biases(model, tensors, expected)
    problems = _problems(expected, tensors) or _tied_conflicts(model, tensors)
    if problems:
        shown = "\n  ".join(problems[:30]) + ("\n  ..." if len(problems) > 30 else "")
        raise CheckpointMismatchError(f"checkpoint {path} does not fit {type(model).__name__} ({len(problems)} problem(s)):\n  {shown}")
    model.load_state_dict(tensors, strict=True)
    if loaded_scales is not None:
        apply_scales(model, loaded_scales)
    return model


__all__ = ["load_checkpoint", "paired_scales", "rebuild_structure"]
