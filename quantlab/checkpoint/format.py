"""The checkpoint file: a safetensors file whose header says what made it; read and checked field by field.

The safetensors header is parsed and checked here before the tensors are read
(size, JSON bounds, dtypes, shapes, offsets that tile the data exactly), so a
truncated or altered file is refused with its name and the field, never half loaded.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from quantlab.config import QuantConfig
from quantlab.errors import FileFormatError, QuantlabError
from quantlab.validation import Fields, check_quant_config, parse_json_text

FORMAT_NAME = "quantlab.checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_SUFFIX = ".safetensors"
#: Largest header accepted (the safetensors library's own bound).
MAX_HEADER_BYTES = 100 << 20
#: safetensors dtype -> (torch dtype, bytes per element).
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
STAGES = ("transform", "refine")


class CheckpointFormatError(FileFormatError):
    """A checkpoint file is not a valid quantlab checkpoint (corrupt, truncated, altered, NaN weights)."""


class CheckpointMismatchError(QuantlabError):
    """A checkpoint does not fit the model it is loaded into (names, shapes, dtypes), or not its scales."""


@dataclasses.dataclass
class CheckpointInfo:
    """What a checkpoint's header records.

    Attributes:
        path: The file.
        calibrator: The calibrator whose run refined these weights.
        source: The compare row it belongs to (``"ptq+cle"``).
        config: The quantization config (its ``algorithms`` and ``algorithm_params``).
        transforms: The transforms' reports (``AlgorithmReport.to_dict()``), in order.
        refinements: The refiners' reports, in order.
        scales: The scales file it pairs with (a file name in the same folder), or None.
        scales_sha256: That file's SHA-256 when the checkpoint was written.
        model: The model's class name.
        tensors: Name -> (dtype name, shape) of every tensor.
    """

    path: Path
    calibrator: str
    source: str
    config: Optional[QuantConfig]
    transforms: List[Dict[str, Any]]
    refinements: List[Dict[str, Any]]
    scales: Optional[str]
    scales_sha256: Optional[str]
    model: str
    tensors: Dict[str, Any]

    def algorithms(self) -> List[str]:
        """Names of the algorithms that ran, in order."""
        return [r["name"] for r in self.transforms + self.refinements]


def _fail(path: Path, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: {message}")


def _read_header(path: Path) -> tuple:
    """(header dict, header length, file size) of a safetensors file, every tensor entry checked."""
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise _fail(path, "is a folder, not a checkpoint file")
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _fail(path, f"truncated: {size} bytes is shorter than any checkpoint (not a safetensors file)")
            length = int.from_bytes(head, "little")
            if length <= 1 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise _fail(path, f"not a safetensors file, or truncated (header of {length} bytes in a file of {size})")
            raw = fh.read(length)
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: checkpoint not found") from None
    except OSError as exc:
        raise _fail(path, f"cannot read the checkpoint ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "not a safetensors file (its header is not text)") from None
    header = parse_json_text(text.rstrip(" "), str(path), error=CheckpointFormatError)
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file (its header is not an object)")
    data_size = size - 8 - length
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r}"
        f = Fields(entry, f"{path}: {where}", CheckpointFormatError)
        dtype = f.string("dtype", required=True, nullable=False, choices=tuple(DTYPES))
        shape = f.array("shape", required=True, nullable=False, max_len=16)
        offsets = f.array("data_offsets", required=True, nullable=False, max_len=2)
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
            raise _fail(path, f"{where}: shape must hold non-negative integers, got {shape!r}"[:300])
        if len(offsets) != 2 or any(not isinstance(o, int) or isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
            raise _fail(path, f"{where}: data_offsets must be [begin, end], got {offsets!r}"[:300])
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        if offsets[1] - offsets[0] != nbytes:
            raise _fail(path, f"{where}: {offsets[1] - offsets[0]} bytes stored for a {dtype} tensor of shape {shape} ({nbytes} bytes)")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _fail(path, f"tensor {name!r}: data does not follow the previous tensor (offset {begin}, expected {position})")
        position = end
    if position != data_size:
        what = "truncated" if position > data_size else "has trailing bytes"
        raise _fail(path, f"{what}: the header describes {position} bytes of tensor data, the file holds {data_size}")
    return header, length, size


def _reports(f: Fields, key: str, stage: str, path: Path) -> List[Dict[str, Any]]:
    out = []
    for i, raw in enumerate(f.array(key) or []):
        r = Fields(raw, f"{path}: {key}[{i}]", CheckpointFormatError)
        r.string("name", required=True, nullable=False, non_empty=True, max_len=200)
        r.string("stage", required=True, nullable=False, choices=(stage,))
        r.number("seconds", low=0.0)
        r.obj("details")
        out.append({"name": raw["name"].lower(), "stage": stage, "seconds": raw.get("seconds") or 0.0,
                    "details": raw.get("details") or {}})
    return out


def parse_metadata(metadata: Any, path: Path) -> Dict[str, Any]:
    """The ``quantlab`` document of a checkpoint's ``__metadata__``, checked."""
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise _fail(path, f"not a quantlab checkpoint (its safetensors metadata has no \"format\": \"{FORMAT_NAME}\")")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _fail(path, f"metadata {key!r} must be a string")
    data = parse_json_text(metadata.get("quantlab", ""), f"{path}: metadata 'quantlab'", error=CheckpointFormatError)
    f = Fields(data, f"{path}: metadata", CheckpointFormatError)
    version = f.integer("version", required=True, nullable=False)
    if not 1 <= version <= FORMAT_VERSION:
        raise _fail(path, f"unsupported checkpoint version {version} (this quantlab reads 1..{FORMAT_VERSION})")
    f.string("calibrator", required=True, nullable=False, max_len=200)
    f.string("source", max_len=400)
    f.string("model", max_len=4096)
    scales = f.string("scales", max_len=4096)
    if scales is not None and (not scales or "/" in scales or "\\" in scales or scales in (".", "..")):
        raise _fail(path, f"metadata: scales must be a plain file name beside the checkpoint, got {scales!r}")
    digest = f.string("scales_sha256", max_len=64)
    if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise _fail(path, "metadata: scales_sha256 must be 64 lower-case hex digits")
    if f.obj("config") is not None:
        check_quant_config(data["config"], f"{path}: metadata: config", CheckpointFormatError)
    return data


def read_checkpoint(path: Union[str, Path], *, tensors: bool = True) -> tuple:
    """Reads and checks a checkpoint; returns ``(CheckpointInfo, {name: tensor} or None)``.

    Every floating-point tensor must be finite.

    Raises:
        CheckpointFormatError: naming the file and what is wrong (missing, truncated, not
            safetensors, not a quantlab checkpoint, a bad field, NaN/Inf in a tensor).
    """
    path = Path(path)
    header, _length, _size = _read_header(path)
    data = parse_metadata(header.get("__metadata__"), path)
    config = None
    if data.get("config"):
        try:
            config = QuantConfig.from_dict(data["config"])
        except Exception as exc:  # noqa: BLE001 - any config problem, named with the file
            raise _fail(path, f"metadata: invalid config ({exc})") from None
    f = Fields(data, f"{path}: metadata", CheckpointFormatError)
    info = CheckpointInfo(
        path=path, calibrator=data["calibrator"], source=data.get("source") or "", config=config,
        transforms=_reports(f, "transforms", "transform", path), refinements=_reports(f, "refinements", "refine", path),
        scales=data.get("scales"), scales_sha256=data.get("scales_sha256"), model=data.get("model") or "",
        tensors={k: (v["dtype"], list(v["shape"])) for k, v in header.items() if k != "__metadata__"},
    )
    if not tensors:
        return info, None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        loaded = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _fail(path, f"cannot read the tensors ({exc})") from None
    for name, tensor in loaded.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise _fail(path, f"tensor {name!r} holds {bad} NaN/Inf value(s): the checkpoint is corrupt")
    return info, loaded


__all__ = ["CHECKPOINT_SUFFIX", "DTYPES", "FORMAT_NAME", "FORMAT_VERSION", "CheckpointFormatError", "CheckpointInfo",
           "CheckpointMismatchError", "parse_metadata", "read_checkpoint"]
