"""Loading a user's model from a ``module:factory`` spec or a safe file.

Never unpickles: state_dicts load with ``torch.load(weights_only=True)``,
TorchScript with ``torch.jit.load`` and exported programs with ``torch.export.load``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from quantlab.errors import QuantlabError


class ModelLoadError(QuantlabError):
    """The model spec or file could not be turned into a model."""


#: Suffixes of saved graphs (not Python): TorchScript and exported programs.
GRAPH_SUFFIXES = (".pt", ".ts", ".pth", ".pt2")


def is_torchscript_spec(spec: str) -> bool:
    """Whether ``spec`` names a TorchScript file (converting it needs an example batch)."""
    return ":" not in str(spec) and Path(str(spec)).suffix in (".pt", ".ts", ".pth")


def _import_target(spec: str):
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        path = Path(spec)
        if path.suffix or "/" in spec or "\\" in spec:
            if not path.exists():
                raise ModelLoadError(f"model file not found: {spec}")
            if path.suffix == ".py":
                raise ModelLoadError(f"model spec {spec!r} names no factory: use '{spec}:FUNCTION' (a function returning the model)")
        raise ModelLoadError(f"model spec {spec!r} must look like 'path/to/file.py:factory' or 'package.module:factory'")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part).resolve()
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {module_part}")
        name = f"quantlab_user_{path.stem}_{abs(hash(str(path)))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ModelLoadError(f"cannot import {module_part}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except SystemExit as exc:  # a script's own sys.exit(): not ours to obey
            sys.modules.pop(name, None)
            raise ModelLoadError(
                f"importing {module_part} called sys.exit({exc.code!r}): a model file must not exit when imported "
                "(guard its script part with `if __name__ == \"__main__\":`)"
            ) from None
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ModelLoadError(f"importing {module_part} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise ModelLoadError(f"cannot import module {module_part!r}: {exc}") from exc
        except SystemExit as exc:
            raise ModelLoadError(f"importing {module_part} called sys.exit({exc.code!r}): a model module must not exit when imported") from None
        except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
            raise ModelLoadError(f"importing {module_part} failed: {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelLoadError(f"{module_part} has no attribute {attr!r}") from None


def load_callable(spec: str):
    """Imports ``module:function`` (or ``file.py:function``) and returns the object."""
    return _import_target(spec)


def load_model(spec: str, *, weights: Optional[str] = None, device: Optional[str] = None,
               example_inputs: Any = None) -> nn.Module:
    """Builds a model from a spec.

    Args:
        spec: ``file.py:factory`` / ``package.module:factory`` (called with no
            arguments), a TorchScript file (``.pt``/``.ts`` saved by
            ``torch.jit.save``) or an exported program (``.pt2``); both are
            rebuilt as quantizable modules (:mod:`quantlab.graph_models`).
        weights: Optional state_dict file loaded with ``weights_only=True``.
        device: Move the model there (default: leave where the factory put it).
        example_inputs: One batch of inputs; needed to convert a TorchScript file only.

    Raises:
        ModelLoadError: naming the spec or file.
    """
    from quantlab import graph_models
    from quantlab.devices import check_device

    if device is not None:
        try:
            check_device(device)  # before any import or load: a bad device is known at once
        except ValueError as exc:
            raise ModelLoadError(f"--device {exc}") from None
    path = Path(spec)
    if ":" not in spec and path.suffix in GRAPH_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {spec}")
        try:
            if path.suffix == ".pt2":
                model = graph_models.load_exported_program(path)
            else:
                model = graph_models.load_torchscript(path, example_inputs)
        except graph_models.GraphModelError as exc:
            raise ModelLoadError(str(exc)) from None
    else:
        factory = _import_target(spec)
        try:
            model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        except SystemExit as exc:
            raise ModelLoadError(f"model factory {spec} called sys.exit({exc.code!r}) instead of returning a model") from None
        except Exception as exc:
            raise ModelLoadError(f"model factory {spec} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"model factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{weights}: cannot load weights safely ({type(exc).__name__}: {exc})") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except Exception as exc:
            raise ModelLoadError(f"{weights}: does not fit the model ({exc})") from exc
    if device is not None:
        model = model.to(device)
    return model.eval()
