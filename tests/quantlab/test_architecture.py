"""The package's import graph: no import loops, no lower layer importing a higher one;
one writer of the run store; evaluation measures without writing.

Every import counts, also those inside functions (a lazy import is still an arrow).
"""
from __future__ import annotations

import ast
import collections
import re
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"quantlab": "quantlab", "calibrators": "quantlab.calibrators", "qat": "quantlab.qat", "ui": "quantlab.ui"}

# Layers, lowest first: a module may import its own layer and those below, never above.
LAYERS = [
    ("calibrators", ["quantlab.calibrators"]),
    # validation (the schema of every file read: scales use it), outputs (output paths checked before work),
    # interrupts (SIGTERM/SIGHUP as KeyboardInterrupt) and devices (--device checks) depend on errors alone.
    ("core", ["quantlab.errors", "quantlab._io", "quantlab.roles", "quantlab.config", "quantlab.registry",
              "quantlab.kernels", "quantlab.statistics", "quantlab.histogram_merge", "quantlab.functional",
              "quantlab.tensor_quantizer", "quantlab.attach", "quantlab.pass_calls", "quantlab.cuda_graphs", "quantlab.graph_capture", "quantlab.batching",
              "quantlab.scales", "quantlab.distributed", "quantlab.validation", "quantlab.outputs",
              "quantlab.interrupts", "quantlab.devices"]),
    # checkpoint: the weights PTQ algorithms changed, saved and rebuilt (it loads scales through the pipeline).
    ("pipeline", ["quantlab.algorithms", "quantlab.pipeline", "quantlab.api", "quantlab.ptq", "quantlab.checkpoint"]),
    # graph_models (saved .pt/.pt2 graphs rebuilt as quantizable modules: beside model_source, which loads
    # them) and trust (whose code a recorded run would import: read by jobs and faces) are services.
    ("services", ["quantlab.data", "quantlab.models", "quantlab.model_source", "quantlab.export", "quantlab.runtimes",
                  "quantlab.evaluation", "quantlab.store", "quantlab.sparsity",
                  "quantlab.graph_models", "quantlab.trust"]),
    ("training", ["quantlab.qat"]),
    # Units of work recorded in the run store (compare, sensitivity, autoprecision, export, run, qat, report, demo).
    ("jobs", ["quantlab.jobs"]),
    ("faces", ["quantlab.cli", "quantlab.ui", "quantlab.__main__"]),
]
# The run store's write methods, and the only modules allowed to call them. (The store's prune is
# ``prune_dead_runs``: a plain ``prune`` would also match the ONNX graph views' ``view.prune()``.)
STORE_WRITES = {"create_run", "set_status", "add_results", "add_layer_stats", "add_artifact", "delete_run", "claim",
                "prune_dead_runs", "add_fidelity", "add_deployment"}
STORE_WRITERS = ("quantlab.store", "quantlab.jobs.recorder")


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


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_only_the_recorder_writes_the_run_store():
    calls = []
    for name, path in _modules().items():
        if _within(name, STORE_WRITERS):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in STORE_WRITES:
                calls.append(f"{name}:{node.lineno} .{node.func.attr}()")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                  and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in STORE_WRITES):
                calls.append(f"{name}:{node.lineno} getattr(..., {node.args[1].value!r})")
    assert calls == []


def test_the_store_check_sees_a_write():
    # The check above would pass on code it cannot see: make sure it finds a call written the usual ways.
    tree = ast.parse("store.add_results(run_id, rows)\ngetattr(store, 'set_status')(run_id, 'done')")
    found = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and (
        isinstance(n.func, ast.Attribute) and n.func.attr in STORE_WRITES
        or isinstance(n.func, ast.Name) and n.func.id == "getattr" and n.args[1].value in STORE_WRITES)]
    assert len(found) == 2


def test_evaluation_measures_without_recording_or_writing_files():
    graph = _imports(_modules())
    writes = sorted(f"{s} -> {t}" for s, ts in graph.items() if s.startswith("quantlab.evaluation")
                    for t in ts if _within(t, ("quantlab.store", "quantlab._io", "quantlab.jobs")))
    assert writes == []


def test_faces_reach_quantlab_by_plain_imports():
    # No lookups of functions by name strings (importlib / __import__) in the CLI's commands or the dashboard.
    found = []
    for name, path in _modules().items():
        if not _within(name, ("quantlab.cli", "quantlab.ui")) or name == "quantlab.cli.main":  # main lists its sub-commands
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"\bimportlib\b|__import__\(", text):
            found.append(name)
    assert found == []


def test_every_package_folder_is_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    listed = set(re.findall(r'"(quantlab(?:\.[a-z_]+)*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    folders = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert folders - listed == set()
