"""The contract between the PTQ pipeline and its transform / refine algorithms."""
from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from torch import nn

from quantlab.errors import QuantlabError


class AlgorithmError(QuantlabError):
    """An algorithm cannot run: unknown name, bad parameter, nothing to act on, NaN on the way."""


class Stage(str, enum.Enum):
    """Where an algorithm runs in the pipeline."""

    TRANSFORM = "transform"  #: floating-point model, before quantizers and statistics
    REFINE = "refine"  #: quantized model, after ranges are applied


@dataclasses.dataclass(frozen=True)
class AlgorithmContext:
    """What an algorithm may use besides the model.

    Attributes:
        forward_loop: ``forward_loop(model)`` runs the calibration batches
            through a model (None when the caller has no data; algorithms that
            need data raise :class:`AlgorithmError` then).
        params: This algorithm's parameters (from the config or the CLI).
        config: The :class:`quantlab.config.QuantConfig` of the run.
        reference_state: For refiners: the float weights and biases the refine
            stage started from (``quantlab.pipeline.refine.refinable_state``), so
            a refiner that runs after another one (which changed the float
            weights) still compares with the FP32 model. None: the model as the
            algorithm finds it is the reference.
    """

    forward_loop: Optional[Callable[[nn.Module], Any]] = None
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config: Any = None
    reference_state: Optional[Mapping[str, Any]] = None


@dataclasses.dataclass
class AlgorithmReport:
    """What one algorithm did, recorded with every artifact of the run.

    Attributes:
        name: The algorithm's registered name.
        stage: Its stage.
        seconds: Wall time.
        details: JSON-safe facts: layers changed, pairs skipped and why, losses.
    """

    name: str
    stage: Stage
    seconds: float = 0.0
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "stage": self.stage.value, "seconds": self.seconds, "details": _json_safe(self.details)}


def _json_safe(value: Any) -> Any:
    """Details as JSON can hold them (they go into scales files, checkpoints and run records)."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # tensors, numpy values
        return _json_safe(value.tolist())
    return str(value)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A registered algorithm.

    Attributes:
        name: Registry name (lower case, e.g. ``"cle"``).
        stage: Transform or refine.
        order: Position within its stage (lower runs first), so the pipeline
            keeps the published order whatever order the user lists them in.
        run: ``run(model, context) -> details`` changes ``model`` in place.
        needs_data: Whether ``context.forward_loop`` is required.
        description: One line for ``--help`` and the dashboard.
        rebuild: ``rebuild(model, details)`` redoes, without data, the STRUCTURAL
            changes ``run`` made (modules replaced, parameters added), given the
            details ``run`` returned: a quantized checkpoint
            (:mod:`quantlab.checkpoint`) rebuilds the transformed model's structure
            with it before loading the weights. None: a data-free transform is
            simply run again (its weights are then overwritten by the checkpoint's);
            a transform that needs data is taken to change weights only.
        params: Its parameters and their defaults (``{"iterations": 1000}``): the CLI
            and the config refuse other names and give values the default's type
            (:mod:`quantlab.algorithms.params`). None: not declared (any name accepted).
        check: ``check(params)`` raises :class:`AlgorithmError` for values ``run`` would
            refuse (bounds, choices, combinations): called by ``check_params`` before any
            work, so a bad value is not found only after the stages before it have run.
    """

    name: str
    stage: Stage
    order: int
    run: Callable[[nn.Module, AlgorithmContext], Dict[str, Any]]
    needs_data: bool = False
    description: str = ""
    rebuild: Optional[Callable[[nn.Module, Dict[str, Any]], None]] = None
    params: Optional[Mapping[str, Any]] = None
    check: Optional[Callable[[Mapping[str, Any]], Any]] = None


_REGISTRY: Dict[str, Algorithm] = {}


def register_algorithm(name: str, stage: Union[Stage, str], order: int, *, needs_data: bool = False,
                       description: str = "", rebuild: Optional[Callable[[nn.Module, Dict[str, Any]], None]] = None,
                       params: Optional[Mapping[str, Any]] = None,
                       check: Optional[Callable[[Mapping[str, Any]], Any]] = None) -> Callable[[Callable[..., Dict[str, Any]]], Callable[..., Dict[str, Any]]]:
    """Decorator registering ``fn(model, context) -> details`` as an algorithm (see :class:`Algorithm`)."""

    def decorator(fn: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key].run is not fn:
            raise ValueError(f"algorithm {name!r} is already registered")
        _REGISTRY[key] = Algorithm(key, Stage(stage), order, fn, needs_data, description, rebuild,
                                   dict(params) if params is not None else None, check)
        return fn

    return decorator


def list_algorithms() -> List[str]:
    """Names of every registered algorithm, in pipeline order."""
    _load_builtins()
    return [a.name for a in sorted(_REGISTRY.values(), key=lambda a: (a.stage is Stage.REFINE, a.order, a.name))]


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered under ``name``.

    Raises:
        AlgorithmError: naming the known algorithms.
    """
    _load_builtins()
    try:
        return _REGISTRY[str(name).strip().lower()]
    except KeyError:
        raise AlgorithmError(f"unknown algorithm {name!r}; known algorithms: {', '.join(list_algorithms()) or 'none'}") from None


def parse_algorithms(names: Union[str, Sequence[str], None]) -> List[Algorithm]:
    """``"cle,bias-correction"`` (or a list) -> validated algorithms in pipeline order, no duplicates."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [n for n in (part.strip() for part in names.split(",")) if n and n.lower() != "none"]
    found = {a.name: a for a in (get_algorithm(n) for n in names)}
    return sorted(found.values(), key=lambda a: (a.stage is Stage.REFINE, a.order, a.name))


def run_stage(model: nn.Module, algorithms: Sequence[Algorithm], stage: Stage, *,
              forward_loop: Optional[Callable[[nn.Module], Any]] = None,
              params: Optional[Mapping[str, Mapping[str, Any]]] = None, config: Any = None,
              reference_state: Optional[Mapping[str, Any]] = None) -> List[AlgorithmReport]:
    """Runs the algorithms of one stage on ``model`` in order; returns their reports.

    Args:
        model: Changed in place.
        algorithms: From :func:`parse_algorithms` (others' stages are skipped).
        stage: The stage to run.
        forward_loop: Calibration batches, for algorithms that need data.
        params: Per-algorithm parameters by name.
        config: The run's quantization config.
        reference_state: The refine stage's starting weights (see :class:`AlgorithmContext`).
    """
    reports = []
    for algorithm in algorithms:
        if algorithm.stage is not stage:
            continue
        if algorithm.needs_data and forward_loop is None:
            raise AlgorithmError(f"algorithm {algorithm.name!r} needs calibration data (a forward loop)")
        context = AlgorithmContext(forward_loop=forward_loop, params=dict((params or {}).get(algorithm.name, {})), config=config,
                                   reference_state=reference_state)
        start = time.perf_counter()
        details = algorithm.run(model, context) or {}
        reports.append(AlgorithmReport(algorithm.name, stage, time.perf_counter() - start, dict(details)))
    return reports


def _load_builtins() -> None:
    """Imports the built-in algorithm modules (they register themselves)."""
    import importlib
    import os
    import pkgutil

    for info in pkgutil.iter_modules([os.path.dirname(__file__)]):
        if info.name not in ("base",) and not info.name.startswith("_"):
            importlib.import_module(f"quantlab.algorithms.{info.name}")
