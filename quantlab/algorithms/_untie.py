"""Untying a weight shared between modules (a tied LM head): its own copy, so a fold can change it alone.

A language model whose ``lm_head`` shares its weight with the token embedding
cannot absorb a per-channel factor in that weight without changing the embedding.
Giving the Linear its own :class:`torch.nn.Parameter` holding an equal copy keeps the
FP32 function exactly and makes the fold possible, at the cost of one more weight.

The module name starts with "_" so the registry does not take it for an algorithm module.
"""
from __future__ import annotations

import collections
from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import nn

from quantlab.algorithms.base import AlgorithmError


def parameter_holders(model: nn.Module) -> Dict[int, List[str]]:
    """``id(parameter)`` -> the names of the modules holding it directly (more than one: tied)."""
    holders: Dict[int, List[str]] = collections.defaultdict(list)
    for name, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)].append(name)
    return dict(holders)


def _clear_tie_flag(model: nn.Module) -> bool:
    """Turns off a Hugging Face config's ``tie_word_embeddings``, so ``tie_weights()`` or a
    ``save_pretrained`` / ``from_pretrained`` round trip does not tie the copy back."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False) is True:
        config.tie_word_embeddings = False
        return True
    return False


def untie_weight(model: nn.Module, name: str, holders: Mapping[int, Sequence[str]]) -> Dict[str, Any]:
    """Gives module ``name`` its own copy of its shared ``weight``; returns what it did (JSON-safe).

    Args:
        model: The model (changed in place).
        name: A module whose ``weight`` is held by other modules too.
        holders: From :func:`parameter_holders` (before any untie).

    Returns:
        ``module``, ``shared_with`` (the other holders), ``parameters`` and ``bytes``
        of the new copy (the extra size of the float model), ``dtype``.
    """
    module = dict(model.named_modules())[name]
    weight = module.weight
    module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return {"module": name, "shared_with": [h for h in holders.get(id(weight), []) if h != name],
            "parameters": int(weight.numel()), "bytes": int(weight.numel() * weight.element_size()),
            "dtype": str(weight.dtype).replace("torch.", ""), "_original": weight}


def retie(model: nn.Module, entry: Mapping[str, Any]) -> None:
    """Undoes :func:`untie_weight` (the fold it was made for did not happen): the shared weight is held again."""
    module = dict(model.named_modules())[entry["module"]]
    module.weight = entry["_original"]


def finish(model: nn.Module, entries: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The report of the kept unties (the config's tie flag cleared if there are any)."""
    kept = [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]
    report: Dict[str, Any] = {"modules": kept, "extra_parameters": sum(e["parameters"] for e in kept),
                              "extra_bytes": sum(e["bytes"] for e in kept)}
    if kept:
        report["config_tie_flag_cleared"] = _clear_tie_flag(model)
    return report


def _untied_modules(details: Mapping[str, Any]) -> List[str]:
    """The module names of a SmoothQuant report's ``untie.modules``, checked (the report is read from a checkpoint)."""
    untie = details.get("untie")
    if untie is None:
        return []
    where = "smoothquant: the checkpoint's untie record"
    if not isinstance(untie, Mapping):
        raise AlgorithmError(f"{where} must be an object, got {type(untie).__name__}")
    entries = untie.get("modules")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise AlgorithmError(f"{where}: modules must be a list, got {type(entries).__name__}")
    names = []
    for i, entry in enumerate(entries):
        name = entry.get("module") if isinstance(entry, Mapping) else None
        if not isinstance(name, str) or not name:
            raise AlgorithmError(f"{where}: modules[{i}] must be an object with a module name, got {entry!r}"[:300])
        names.append(name)
    return names


def rebuild_untied(model: nn.Module, details: Mapping[str, Any]) -> None:
    """Redoes the unties recorded in a SmoothQuant report on the FP32 model (checkpoint loading), so the
    separate weights load into separate parameters instead of both into the shared one.

    Raises:
        AlgorithmError: the record is malformed (it comes from a file), or a recorded module
            is missing or has no weight.
    """
    names = _untied_modules(details)
    if not names:
        return
    modules = dict(model.named_modules())
    holders = parameter_holders(model)
    for name in names:
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise AlgorithmError(f"smoothquant: the checkpoint untied the weight of '{name}', which "
                                 f"{type(model).__name__} {'lacks' if module is None else 'has no weight in'}")
        if len(holders.get(id(module.weight), [])) > 1:
            untie_weight(model, name, holders)
    _clear_tie_flag(model)


__all__ = ["finish", "parameter_holders", "rebuild_untied", "retie", "untie_weight"]
