"""Small hand-built ONNX graphs (onnx.helper) for the check and placement tests."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

C = 4


class GraphBuilder:
    """Collects nodes and initializers; ``model()`` returns a checked ModelProto."""

    def __init__(self, opset: int = 17) -> None:
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.opset = opset
        self.rng = np.random.default_rng(0)
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: Optional[str] = None, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name or self.name(op), **attrs))
        return out

    def qdq(self, x: str, scale: float = 0.05, zero_point=np.int8(0), name: Optional[str] = None) -> str:
        s = self.const(np.array(scale, dtype=np.float32), "scale")
        z = self.const(np.array(zero_point), "zp")
        q = self.node("QuantizeLinear", [x, s, z], name=(name + "_q") if name else None)
        return self.node("DequantizeLinear", [q, s, z], name=(name + "_dq") if name else None)

    def weight_dq(self, shape=(C, C, 3, 3), axis: int = 0, scale_len: Optional[int] = None) -> str:
        w = self.const(self.rng.integers(-127, 128, size=shape).astype(np.int8), "w")
        n = scale_len if scale_len is not None else shape[axis]
        s = self.const(np.full(n, 0.01, dtype=np.float32), "ws")
        z = self.const(np.zeros(n, dtype=np.int8), "wz")
        return self.node("DequantizeLinear", [w, s, z], axis=axis)

    def conv(self, x: str, *, quantize_input: bool = True, name: Optional[str] = None) -> str:
        inp = self.qdq(x) if quantize_input else x
        return self.node("Conv", [inp, self.weight_dq()], name=name, pads=[1, 1, 1, 1])

    def model(self, inputs: Sequence[str], outputs: Sequence[str], shape=(1, C, 8, 8), out_shape=None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info(i, TensorProto.FLOAT, list(shape)) for i in inputs],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(out_shape or shape)) for o in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def good_conv_model() -> onnx.ModelProto:
    """input -> Q/DQ -> Conv -> Relu -> Q/DQ -> Conv -> output: no finding."""
    b = GraphBuilder()
    y = b.node("Relu", [b.conv("input")])
    out = b.conv(y)
    return b.model(["input"], [out])
