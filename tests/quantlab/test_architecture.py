"""The package's import graph: no import loops, no lower layer importing a higher one.

Every import counts, also those inside functions (a lazy import is still an arrow).
"""
from __future__ import annotations

import ast
import collections
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"quantlab": "quantlab", "calibrators": "quantlab.calibrators", "qat": "quantlab.qat", "ui": "quantlab.ui"}

# Layers, lowest first: a module may import its own layer and those below, never above.
LAYERS = [
    ("calibrators", ["quantlab.calibrators"]),
    ("core", ["quantlab.errors", "quantlab._io", "quantlab.roles", "quantlab.config", "quantlab.registry",
              "quantlab.kernels", "quantlab.statistics", "quantlab.histogram_merge", "quantlab.functional",
              "quantlab.tensor_quantizer", "quantlab.attach", "quantlab.cuda_graphs", "quantlab.batching",
              "quantlab.scales", "quantlab.distributed", "quantlab.validation", "quantlab.outputs",
              "quantlab.interrupts", "quantlab.devices"]),
    ("pipeline", ["quantlab.algorithms", "quantlab.pipeline", "quantlab.api", "quantlab.ptq"]),
    ("services", ["quantlab.data", "quantlab.models", "quantlab.model_source", "quantlab.export", "quantlab.runtimes",
                  "quantlab.evaluation", "quantlab.store", "quantlab.sparsity",
                  "quantlab.graph_models", "quantlab.trust"]),
    ("training", ["quantlab.qat"]),
    ("jobs", ["quantlab.jobs"]),
    ("faces", ["quantlab.cli", "quantlab.ui", "quantlab.__main__"]),
]


def _modules() -> Dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package] + parts)] = path
    return found


def _imports(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = collections.defaultdict(set)
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: None if is_package else -1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _layer(module: str) -> int:
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None or module == "quantlab", f"{module} has no layer: add it to LAYERS"
    return rank if rank is not None else len(LAYERS)


def test_there_are_no_import_loops():
    graph = _imports(_modules())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    loops: List[List[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for module in list(graph):
        if module not in index:
            visit(module)
    assert loops == []


def test_no_layer_imports_a_higher_one():
    modules = _modules()
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in _imports(modules).items()
        for target in targets
        if source != "quantlab" and target != "quantlab" and _layer(target) > _layer(source)
    )
    assert upward == []


def test_calibrators_import_nothing_of_quantlab():
    graph = _imports(_modules())
    outside = sorted(f"{s} -> {t}" for s, ts in graph.items() if s.startswith("quantlab.calibrators")
                     for t in ts if not t.startswith("quantlab.calibrators"))
    assert outside == []
