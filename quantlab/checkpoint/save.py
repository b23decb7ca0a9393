"""Writing checkpoints: the transformed, refined weights beside their scales file."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from quantlab._io import write_bytes_atomic
from quantlab.checkpoint.format import CHECKPOINT_SUFFIX, FORMAT_NAME, FORMAT_VERSION
from quantlab.checkpoint.state import float_state_dict
from quantlab.outputs import Replaceable, check_output_file

PathLike = Union[str, Path]


def _is_checkpoint(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return f'"format":"{FORMAT_NAME}"'.encode() in head


#: An existing checkpoint may be replaced by a new one (a re-run into the same folder); nothing else.
CHECKPOINT_FILE = Replaceable("a quantlab checkpoint", _is_checkpoint)


def scales_name(calibrator: str, source: Optional[str] = None) -> str:
    """``scales.<calibrator>.json``, or ``scales.<calibrator>.<source>.json`` for another compare row's pipeline."""
    return f"scales.{calibrator}.json" if not source else f"scales.{calibrator}.{source}.json"


def checkpoint_name(calibrator: str, source: Optional[str] = None) -> str:
    """``model.<calibrator>.safetensors`` (or ``model.<calibrator>.<source>.safetensors``), beside the scales."""
    return f"model.{calibrator}{CHECKPOINT_SUFFIX}" if not source else f"model.{calibrator}.{source}{CHECKPOINT_SUFFIX}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.detach().cpu().tolist())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def report_dicts(reports: Sequence[Any]) -> List[Dict[str, Any]]:
    """JSON-safe dicts of algorithm reports (objects with ``to_dict`` or dicts)."""
    return [_json_safe(r.to_dict() if hasattr(r, "to_dict") else dict(r)) for r in reports]


def changes_weights(result: Any) -> bool:
    """Whether a :class:`~quantlab.pipeline.PTQResult`'s algorithms changed the model's weights (a checkpoint is needed)."""
    return bool(result.transforms) or any(result.refinements.values())


def save_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    calibrator: str,
    config: Any = None,
    transforms: Sequence[Any] = (),
    refinements: Sequence[Any] = (),
    scales_path: Optional[PathLike] = None,
    source: str = "",
    overrides: Optional[Mapping[str, torch.Tensor]] = None,
    inputs: Optional[Mapping[str, Optional[PathLike]]] = None,
) -> Path:
    """Writes ``model``'s floating-point weights and what made them as a safetensors checkpoint, atomically.

    Args:
        model: The transformed (and refined) model, quantized or not.
        path: The ``.safetensors`` file (checked first: never one of ``inputs`` or the
            scales file, never over a file that is not a quantlab checkpoint).
        calibrator: The calibrator of the run.
        config: The :class:`~quantlab.config.QuantConfig` (algorithms and their parameters).
        transforms / refinements: The algorithms' reports.
        scales_path: The scales file written for the same weights (its name and
            SHA-256 are recorded; it must lie beside the checkpoint).
        source: The compare row (``"ptq+cle"``).
        overrides: One calibrator's refined weights (``PTQResult.refined_weights[name]``).
        inputs: ``{label: path}`` of the command's inputs.

    Raises:
        OutputPathError: ``path`` is an input, a folder, or an existing file of another kind.
    """
    from safetensors.torch import save

    path = Path(path)
    sources = dict(inputs or {})
    if scales_path is not None:
        sources["the scales file"] = scales_path
    check_output_file(path, label="checkpoint", inputs=sources, replace=CHECKPOINT_FILE)
    digest = None
    if scales_path is not None:
        scales_path = Path(scales_path)
        if scales_path.resolve().parent != path.resolve().parent:
            raise ValueError(f"the scales file {scales_path} must lie beside the checkpoint {path}")
        digest = hashlib.sha256(scales_path.read_bytes()).hexdigest()
    document = {
        "version": FORMAT_VERSION,
        "calibrator": calibrator,
        "source": source,
        "model": type(model).__name__,
        "config": config.to_dict() if config is not None else None,
        "transforms": report_dicts(transforms),
        "refinements": report_dicts(refinements),
        "scales": scales_path.name if scales_path is not None else None,
        "scales_sha256": digest,
    }
    metadata = {"format": FORMAT_NAME, "quantlab": json.dumps(_json_safe(document), allow_nan=False, sort_keys=True)}
    data = save(float_state_dict(model, overrides), metadata=metadata)
    return write_bytes_atomic(path, data)


def save_ptq_files(result: Any, model: nn.Module, out_dir: PathLike, *, config: Any = None,
                   source: Optional[str] = None, row_source: str = "") -> Dict[str, Path]:
    """Writes each calibrator's scales file and, where algorithms changed the weights, its checkpoint.

    Args:
        result: The :class:`~quantlab.pipeline.PTQResult` of ``model``.
        model: The model the pipeline ran on (it holds the last calibrator's refined weights;
            the others come from ``result.refined_weights``).
        out_dir: The folder.
        config: The run's quantization config (default: the scales').
        source: Name the files for this compare row (``scales.<calibrator>.<source>.json``);
            None: the plain names.
        row_source: The compare row recorded in the checkpoint (default ``source``).

    Returns:
        ``{"scales.<calibrator>[.<source>]": path, "model.<calibrator>[.<source>]": path}``.
    """
    out = Path(out_dir)
    written: Dict[str, Path] = {}
    for name, scales in result.scales.items():
        scales_path = scales.save(out / scales_name(name, source))
        written[scales_path.name[: -len(".json")]] = scales_path
        if not changes_weights(result):
            continue
        path = save_checkpoint(
            model, out / checkpoint_name(name, source), calibrator=name, config=config or scales.config,
            transforms=result.transforms, refinements=result.refinements.get(name, []), scales_path=scales_path,
            source=row_source or source or "", overrides=result.refined_weights.get(name),
        )
        written[path.name[: -len(CHECKPOINT_SUFFIX)]] = path
    return written


__all__ = ["CHECKPOINT_FILE", "changes_weights", "checkpoint_name", "report_dicts", "save_checkpoint", "save_ptq_files",
           "scales_name"]
