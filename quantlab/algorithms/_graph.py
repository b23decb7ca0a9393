"""The model's data flow, as the transforms need it: which module's output feeds which.

``torch.fx`` traces ``model.forward`` into a graph of calls. By default fx looks
inside every module that is not part of ``torch.nn``, so a Conv2d subclass with
its own ``forward`` (EfficientNet's ``Conv2dStaticSamePadding``) would dissolve
into ``F.pad`` + ``F.conv2d`` calls and could no longer be paired. The tracer here
keeps every quantizable module (any subclass of a registered type), every
BatchNorm and every ``torch.nn`` module as one call.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from quantlab.registry import lookup_quantizable


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps quantizable modules and BatchNorms as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if lookup_quantizable(m) is not None or isinstance(m, _BatchNorm):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclasses.dataclass
class Dataflow:
    """A traced model: its graph, its modules by name, and how often each module is called.

    Attributes:
        graph: The fx graph of ``model.forward``.
        modules: ``dict(model.named_modules())`` at trace time.
        calls: Number of ``call_module`` nodes per module name (a module called twice
            computes two things: folding or scaling it for one call changes the other).
    """

    graph: fx.Graph
    modules: Dict[str, nn.Module]
    calls: Dict[str, int]

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        """The module a ``call_module`` node calls, else None."""
        return self.modules.get(node.target) if node.op == "call_module" else None

    def called_once(self, node: fx.Node) -> bool:
        return node.op == "call_module" and self.calls.get(node.target, 0) == 1

    def module_nodes(self) -> List[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "call_module"]


def trace(model: nn.Module) -> Tuple[Optional[Dataflow], Optional[str]]:
    """Traces ``model``; returns ``(dataflow, None)``, or ``(None, why)`` when fx cannot trace it."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure (data-dependent control flow, ...): caller falls back
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return Dataflow(graph, dict(model.named_modules()), calls), None


def module_uses(model: nn.Module) -> Dict[int, int]:
    """How many places of the module tree hold each module object (by ``id``): a shared module counts > 1."""
    uses: Dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    return uses


def plain_sequentials(model: nn.Module) -> List[Tuple[str, nn.Sequential]]:
    """``nn.Sequential`` containers whose ``forward`` is Sequential's own: each child feeds the next and nothing else."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` in place of the module at dotted path ``name``, and at every other path that holds
    the same module object (an alias such as ``self.act2 = self.act``: fx names both calls ``act``)."""
    old = model.get_submodule(name)
    paths = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n]
    for path in paths or [name]:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
