"""What an export produced: the file, the quantizer -> tensor map, what the passes did."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from quantlab._io import write_text_atomic


@dataclasses.dataclass
class ExportResult:
    """One exported ONNX model.

    Attributes:
        path: The ``.onnx`` file.
        precision: ``"int8"``, ``"fp16"`` or ``"fp32"``.
        target: For INT8, ``"tensorrt"`` or ``"ort-cpu"``; None for float exports.
        exporter: ``"torchscript"`` or ``"dynamo"``.
        opset: Default-domain opset of the file.
        input_names: Graph input names.
        output_names: Graph output names.
        tensor_map: ``{"module:input" | "module:weight": ONNX tensor name}``; the
            calibration cache is keyed by the input entries of an FP32 export.
        unmapped: Quantizer keys with no node in the graph (module never called).
        folded_batchnorm: BatchNormalization nodes folded into the conv before them.
        placement: What the placement pass changed (INT8 only).
        ort_cpu: For ``--target ort-cpu``, how many layers became which kernel.
        ort_int8: For ``--target ort-cpu``, the integer form: ``form``, ``requested``,
            ``weight_bits``, ``exact_here`` (on the exporting CPU) and ``chosen_on``.
        sidecar: The JSON file written next to the model with all of the above.
        seconds: Wall time of the export.
    """

    path: Path
    precision: str
    target: Optional[str]
    exporter: str
    opset: int
    input_names: List[str]
    output_names: List[str]
    tensor_map: Dict[str, str]
    unmapped: List[str] = dataclasses.field(default_factory=list)
    folded_batchnorm: List[str] = dataclasses.field(default_factory=list)
    placement: Optional[Dict[str, Any]] = None
    ort_cpu: Optional[Dict[str, int]] = None
    ort_int8: Optional[Dict[str, Any]] = None
    sidecar: Optional[Path] = None
    seconds: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        data["sidecar"] = str(self.sidecar) if self.sidecar else None
        return data

    def input_tensors(self) -> Dict[str, str]:
        """``{module: tensor}`` for the input quantizers only."""
        return {k[: -len(":input")]: v for k, v in self.tensor_map.items() if k.endswith(":input")}


def sidecar_path(model_path: Path) -> Path:
    """``model.int8.onnx`` -> ``model.int8.onnx.json``."""
    return model_path.with_name(model_path.name + ".json")


def write_sidecar(result: ExportResult) -> Path:
    path = sidecar_path(result.path)
    result.sidecar = path
    write_text_atomic(path, json.dumps({"format": "quantlab.export", "version": 1, **result.to_dict()}, indent=1))
    return path


__all__ = ["ExportResult", "sidecar_path", "write_sidecar"]
