"""A small editable view of an ONNX graph: constants, producers, consumers, unique names.

The export passes (weight folding, BatchNorm folding, placement, the ort-cpu
rewrite) and the checker all need the same few queries: "which node produces
this tensor", "who consumes it", "is it a build-time constant, and what is its
value". :class:`GraphView` answers them over a plain list of nodes and writes
the result back with :meth:`GraphView.commit`.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import numpy_helper

from quantlab._io import atomic_path
from quantlab.export.errors import OnnxFormatError

#: ONNX operators whose weight input makes them the "weighted ops" of TensorRT's guide.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def load_onnx(path: Union[str, Path], *, check: bool = True) -> onnx.ModelProto:
    """Reads an ONNX file, turning every way it can be unreadable into one clear error.

    Args:
        path: The ``.onnx`` file (external data next to it is loaded too).
        check: Run ``onnx.checker`` (catches truncated or inconsistent graphs).

    Raises:
        FileNotFoundError: the file does not exist.
        OnnxFormatError: empty, not ONNX, truncated, or rejected by the checker.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    if path.stat().st_size == 0:
        raise OnnxFormatError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
        raise OnnxFormatError(f"{path}: not an ONNX model or truncated ({type(exc).__name__}: {exc})") from None
    if not model.opset_import or not model.graph.node or model.ir_version <= 0:
        raise OnnxFormatError(f"{path}: not an ONNX model (no opset, IR version or graph nodes)")
    if check:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:  # noqa: BLE001 - ValidationError and protobuf errors
            raise OnnxFormatError(f"{path}: invalid ONNX model ({str(exc).splitlines()[0][:300]})") from None
    return model


def save_onnx(model: onnx.ModelProto, path: Union[str, Path]) -> Path:
    """Writes ``model`` atomically (complete file or nothing)."""
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return Path(path)


def default_opset(model: onnx.ModelProto) -> int:
    """The opset version of the default ("" / ai.onnx) domain, 0 if absent."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def get_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def node_label(node: onnx.NodeProto) -> str:
    """A node's name, or ``op_type(first output)`` for unnamed nodes."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


class GraphView:
    """Editable view of ``model.graph``; call :meth:`commit` to write changes back.

    Nodes live in :attr:`nodes` (a Python list); initializers in a dict by name.
    After structural edits call :meth:`refresh` to rebuild producer/consumer maps.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.nodes: List[onnx.NodeProto] = list(self.graph.node)
        self.initializers: Dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self._arrays: Dict[str, np.ndarray] = {}
        self._counter = itertools.count()
        self.refresh()

    # -- structure -------------------------------------------------------------------------
    def refresh(self) -> None:
        self.producer: Dict[str, onnx.NodeProto] = {}
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.graph_inputs = {v.name for v in self.graph.input}
        self.graph_outputs = {v.name for v in self.graph.output}

    def uses(self, tensor: str) -> List[onnx.NodeProto]:
        return self.consumers.get(tensor, [])

    def is_graph_output(self, tensor: str) -> bool:
        return tensor in self.graph_outputs

    def only_consumer(self, tensor: str) -> Optional[onnx.NodeProto]:
        """The single node consuming ``tensor`` (None if several, none, or a graph output)."""
        users = self.uses(tensor)
        if len(users) != 1 or self.is_graph_output(tensor):
            return None
        return users[0]

    # -- constants -------------------------------------------------------------------------
    def const(self, name: str) -> Optional[np.ndarray]:
        """Value of an initializer or Constant-node output, else None."""
        if not name:
            return None
        if name in self._arrays:
            return self._arrays[name]
        if name in self.initializers and name not in self.graph_inputs:
            value = numpy_helper.to_array(self.initializers[name])
        else:
            node = self.producer.get(name)
            if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                return None
            value = _constant_node_value(node)
            if value is None:
                return None
        self._arrays[name] = value
        return value

    def is_const(self, name: str) -> bool:
        return self.const(name) is not None

    def set_initializer(self, name: str, array: np.ndarray) -> str:
        """Adds or replaces initializer ``name`` with ``array``."""
        array = np.asarray(array)
        self.initializers[name] = numpy_helper.from_array(array, name)
        self._arrays[name] = array
        return name

    def add_initializer(self, array: np.ndarray, hint: str) -> str:
        """Adds ``array`` under a fresh name derived from ``hint``; returns the name."""
        return self.set_initializer(self.unique(hint), array)

    def unique(self, hint: str) -> str:
        """A tensor/node name not used anywhere in the graph yet."""
        taken = self._taken_names()
        if hint not in taken:
            self._taken.add(hint)
            return hint
        while True:
            name = f"{hint}_{next(self._counter)}"
            if name not in taken:
                self._taken.add(name)
                return name

    def _taken_names(self) -> set:
        if not hasattr(self, "_taken"):
            self._taken = set()
        names = set(self.initializers) | set(self.producer) | set(self.consumers) | self._taken
        names |= {n.name for n in self.nodes} | self.graph_inputs | self.graph_outputs
        return names

    # -- edits -----------------------------------------------------------------------------
    def remove(self, nodes: Iterable[onnx.NodeProto]) -> None:
        drop = {id(n) for n in nodes}
        self.nodes = [n for n in self.nodes if id(n) not in drop]

    def insert_after(self, anchor: Optional[onnx.NodeProto], new_nodes: Sequence[onnx.NodeProto]) -> None:
        """Inserts nodes right after ``anchor`` (at the front when None); order is fixed by :meth:`toposort`."""
        if anchor is None:
            self.nodes[0:0] = list(new_nodes)
            return
        for i, node in enumerate(self.nodes):
            if node is anchor:
                self.nodes[i + 1 : i + 1] = list(new_nodes)
                return
        self.nodes.extend(new_nodes)

    def replace_uses(self, old: str, new: str, *, only: Optional[Iterable[onnx.NodeProto]] = None) -> None:
        """Points consumers of tensor ``old`` at ``new`` (all, or just ``only``)."""
        targets = {id(n) for n in only} if only is not None else None
        for node in self.nodes:
            if targets is not None and id(node) not in targets:
                continue
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new

    def toposort(self) -> None:
        """Orders nodes topologically (ONNX requires it; passes append freely)."""
        available = set(self.graph_inputs) | set(self.initializers) | {""}
        pending = list(self.nodes)
        ordered: List[onnx.NodeProto] = []
        while pending:
            rest = []
            for node in pending:
                needed = [i for i in node.input if i] + _subgraph_inputs(node)
                if all(i in available for i in needed):
                    ordered.append(node)
                    available.update(node.output)
                else:
                    rest.append(node)
            if len(rest) == len(pending):  # a cycle or an outer-scope name: keep the original order
                ordered.extend(rest)
                break
            pending = rest
        self.nodes = ordered

    def prune(self) -> None:
        """Removes nodes and initializers that no graph output depends on."""
        self.toposort()  # the reverse scan below needs producers before consumers
        self.refresh()
        live = set(self.graph_outputs)
        keep: List[onnx.NodeProto] = []
        for node in reversed(self.nodes):
            if any(o in live for o in node.output):
                keep.append(node)
                live.update(i for i in node.input if i)
                live.update(_subgraph_inputs(node))
        self.nodes = list(reversed(keep))
        self.initializers = {k: v for k, v in self.initializers.items() if k in live}
        self._arrays = {k: v for k, v in self._arrays.items() if k in live}
        self.refresh()

    def constants_to_initializers(self) -> None:
        """Turns Constant nodes into initializers, so every constant is found one way."""
        keep = []
        for node in self.nodes:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not self.is_graph_output(node.output[0]):
                value = _constant_node_value(node)
                if value is not None:
                    self.set_initializer(node.output[0], value)
                    continue
            keep.append(node)
        self.nodes = keep
        self.refresh()

    def commit(self) -> onnx.ModelProto:
        """Writes nodes and initializers back into the model (value_info is dropped: shapes changed)."""
        self.toposort()
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        used = {i for n in self.nodes for i in n.input} | self.graph_outputs
        for node in self.nodes:
            used.update(_subgraph_inputs(node))
        del self.graph.initializer[:]
        self.graph.initializer.extend(t for name, t in self.initializers.items() if name in used)
        del self.graph.value_info[:]
        self.nodes = list(self.graph.node)  # the container copied the messages
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.refresh()
        return self.model


def _constant_node_value(node: onnx.NodeProto) -> Optional[np.ndarray]:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def _subgraph_inputs(node: onnx.NodeProto) -> List[str]:
    """Outer-scope names used inside If/Loop/Scan bodies (so pruning keeps their producers)."""
    names: List[str] = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            inner = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                inner.update(n.output)
            for n in g.node:
                names.extend(i for i in n.input if i and i not in inner)
                names.extend(_subgraph_inputs(n))
    return names


__all__ = [
    "GraphView",
    "QDQ_OPS",
    "WEIGHTED_OPS",
    "default_opset",
    "get_attr",
    "load_onnx",
    "node_label",
    "save_onnx",
    "set_attr",
]
