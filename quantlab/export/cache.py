"""TensorRT's legacy calibration cache (implicit quantization, TensorRT <= 10.x).

Text format, one entry per line::

    TRT-8601-EntropyCalibration2
    input: 3c008912
    /stem/stem.2/Relu_output_0: 3d8f5c29

The header holds TensorRT's version as one integer (``NV_TENSORRT_VERSION``:
``major*1000 + minor*100 + patch`` up to 9.x, e.g. 8.6.1 -> 8601;
``major*10000 + minor*100 + patch`` from 10.0, e.g. 10.3.0 -> 100300) and the
calibrator's algorithm. TensorRT ignores (recalibrates) a cache whose header does
not match its own version and algorithm, so both are parameters. Each entry is
the big-endian IEEE-754 float32 bit pattern of the SCALE (``amax / 127``) of an
ONNX tensor of the FP32 graph, in hex: ``3c008912`` is 0.0078452, amax ~ 0.996.

Only the inputs of quantized layers get entries (that is what quantlab
calibrates); TensorRT leaves tensors without a range in floating point.

The header's algorithm is NOT how the scales were chosen (see :func:`header_note`):
it names the TensorRT calibrator that reads the cache. A quantlab cache says
``EntropyCalibration2`` for scales of any calibrator (mse, percentile, max, ...),
and ``<cache>.json`` beside it records where the scales came from.
"""
from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

from quantlab._io import write_text_atomic
from quantlab.export.errors import CacheFormatError, TensorMappingError
from quantlab.roles import Role
from quantlab.scales import Scales
from quantlab.validation import TENSORRT_NUM_BITS, check_amax, check_num_bits, check_scale, effective_scale

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
DEFAULT_ALGORITHM = "EntropyCalibration2"
_HEADER_RE = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{1,8}$")
#: A cache line is ~60 bytes: 64 MB is a million tensors, far beyond any network.
MAX_CACHE_BYTES = 64 << 20


def header_note(algorithm: str = DEFAULT_ALGORITHM, scales_from: Optional[str] = None) -> str:
    """Why the header names ``algorithm`` whatever chose the scales (CLI help, Export page, cache sidecar)."""
    source = f"quantlab's {scales_from} calibrator" if scales_from else "quantlab's calibrator (see the scales file)"
    return (
        f"The header's '{algorithm}' does not say how the scales were chosen: it names the TensorRT calibrator "
        f"that reads the cache (IInt8EntropyCalibrator2 is EntropyCalibration2, IInt8MinMaxCalibrator is MinMaxCalibration). "
        "TensorRT uses a cache only when its header matches its own version and that calibrator's algorithm, and then "
        "takes the scales as they are; on a mismatch it ignores the cache and recalibrates with its own algorithm. "
        f"The scales in this cache came from {source}."
    )


def trt_version_number(version: Union[str, int]) -> int:
    """TensorRT version as the integer of the cache header.

    Accepts ``"8.6.1"``, ``"10.3"``, ``"10.3.0"`` or the integer itself (``8601``, ``100300``).

    Raises:
        ValueError: for anything else (e.g. ``"10.x"``: the exact version matters).
    """
    text = str(version).strip()
    if text.isdigit():
        return int(text)
    parts = text.split(".")
    if not 2 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"TensorRT version {version!r} is not a version: give it as MAJOR.MINOR[.PATCH] (e.g. 8.6.1 or 10.3.0) "
            "or as the header integer (8601, 100300); TensorRT recalibrates when the header does not match exactly"
        )
    major, minor = int(parts[0]), int(parts[1])
    patch = int(parts[2]) if len(parts) > 2 else 0
    if minor > 99 or patch > 99:
        raise ValueError(f"TensorRT version {version!r}: minor and patch must be below 100")
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def scale_to_hex(scale: float) -> str:
    """Big-endian float32 bit pattern of ``scale`` as 8 lowercase hex digits."""
    return struct.pack(">f", float(scale)).hex()


def hex_to_scale(text: str) -> float:
    """Inverse of :func:`scale_to_hex` (TensorRT sometimes drops leading zeros)."""
    return struct.unpack(">f", bytes.fromhex(text.strip().rjust(8, "0")))[0]


@dataclasses.dataclass
class CalibrationCache:
    """The content of a calibration cache.

    Attributes:
        version: The header's TensorRT version integer.
        algorithm: The header's algorithm (``EntropyCalibration2`` ...).
        scales: ``{tensor name: scale}`` (float32 values), in file order.
    """

    version: int
    algorithm: str
    scales: Dict[str, float]

    @property
    def header(self) -> str:
        return f"TRT-{self.version}-{self.algorithm}"

    def amax(self, tensor: str) -> float:
        """``scale * 127`` of one tensor."""
        return self.scales[tensor] * 127.0

    def to_text(self) -> str:
        for name, scale in self.scales.items():  # never a scale TensorRT cannot use (e.g. 00000000)
            check_scale(scale, f"calibration cache entry {name!r}", error=CacheFormatError)
        lines = [self.header] + [f"{name}: {scale_to_hex(scale)}" for name, scale in self.scales.items()]
        return "\n".join(lines) + "\n"

    def save(self, path: Union[str, Path]) -> Path:
        """Writes the cache atomically."""
        return write_text_atomic(path, self.to_text())


def read_calibration_cache(path: Union[str, Path]) -> CalibrationCache:
    """Reads a cache written by quantlab or by TensorRT itself.

    Tensor names may contain spaces, brackets and colons (TensorRT writes names
    like ``(Unnamed Layer* 3) [Convolution]_output``), so each line is split at
    its LAST ``": "``. Blank lines are ignored.

    Every scale is checked: finite, > 0 and a normal float32 (a 0, subnormal,
    NaN or Inf scale is an error naming the line, never a silent range).

    Raises:
        FileNotFoundError: no such file.
        CacheFormatError: naming the file and line of the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such calibration cache")
    if path.stat().st_size > MAX_CACHE_BYTES:
        raise CacheFormatError(f"{path}: {path.stat().st_size / 1e6:.0f} MB is larger than any calibration cache")
    try:
        text = path.read_bytes().decode("ascii")
    except UnicodeDecodeError:
        raise CacheFormatError(f"{path}: not a TensorRT calibration cache (binary, not ASCII text)") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise CacheFormatError(f"{path}: empty calibration cache (no TRT-<version>-<algorithm> header)")
    match = _HEADER_RE.match(lines[0].strip())
    if match is None:
        raise CacheFormatError(f"{path}:1: header {lines[0][:60]!r} is not TRT-<version>-<algorithm>")
    scales: Dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(": ")
        if not sep or not name or not _HEX_RE.match(value.strip()):
            raise CacheFormatError(f"{path}:{number}: expected '<tensor name>: <8 hex digits>', got {line[:80]!r}")
        if name in scales:
            raise CacheFormatError(f"{path}:{number}: tensor {name[:80]!r} has a second entry")
        scales[name] = check_scale(hex_to_scale(value), f"{path}:{number}: {name[:80]!r}", error=CacheFormatError)
    return CalibrationCache(version=int(match.group(1)), algorithm=match.group(2), scales=scales)


def cache_from_scales(
    scales: Scales,
    tensor_map: Mapping[str, str],
    *,
    trt_version: Union[str, int],
    algorithm: str = DEFAULT_ALGORITHM,
    strict: bool = True,
) -> CalibrationCache:
    """Builds a cache from quantlab scales and a quantizer -> tensor map of the FP32 graph.

    Args:
        scales: The calibrated scales (activation entries are used).
        tensor_map: ``{"module:input": tensor}`` from the FP32 export
            (:attr:`ExportResult.tensor_map` or the ONNX metadata).
        trt_version: The user's TensorRT version (see :func:`trt_version_number`).
        algorithm: Header algorithm; ``EntropyCalibration2`` matches TensorRT's default calibrator.
        strict: Every activation scale must map to a tensor.

    Two layers reading the same tensor get one entry with the larger amax
    (TensorRT keeps one range per tensor).

    Raises:
        TensorMappingError: listing the layers with no tensor (strict).
        ValueError: bad version or algorithm.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown calibration algorithm {algorithm!r}; TensorRT writes one of {', '.join(ALGORITHMS)}")
    version = trt_version_number(trt_version)
    if version >= 110000:
        raise ValueError(
            f"TensorRT {trt_version} has no implicit quantization (calibration caches were removed in 11.0): "
            "build from the Q/DQ model instead (quantlab export --precision int8)"
        )
    entries: Dict[str, float] = {}
    missing: List[str] = []
    for entry in scales.entries:
        if entry.role is not Role.INPUT:
            continue
        tensor = tensor_map.get(entry.key)
        if tensor is None:
            missing.append(entry.key)
            continue
        if isinstance(entry.scale, list):
            raise TensorMappingError(f"'{entry.key}' has a per-channel activation scale; a calibration cache holds one scale per tensor")
        check_num_bits(entry.num_bits, f"'{entry.key}'", CacheFormatError, allowed=TENSORRT_NUM_BITS)
        check_amax(entry.amax, f"'{entry.key}'", role=entry.role, num_bits=entry.num_bits, error=CacheFormatError)
        # The float32 TensorRT reads, computed as the fake quantizer and the Q/DQ export do.
        scale = check_scale(effective_scale(entry.amax, entry.num_bits), f"'{entry.key}'", error=CacheFormatError)
        entries[tensor] = max(entries.get(tensor, 0.0), scale)
    if missing and strict:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise TensorMappingError(
            f"{len(missing)} activation scale(s) have no tensor in the FP32 graph: {shown}; "
            "export the FP32 model with quantlab (quantlab export --precision fp32) so its tensor names are recorded"
        )
    if not entries:
        raise TensorMappingError("no activation scale matched a tensor of the FP32 graph: is this the same model?")
    return CalibrationCache(version=version, algorithm=algorithm, scales=entries)


def tensor_map_from_onnx(onnx_path: Union[str, Path], module_names: Optional[List[str]] = None) -> Dict[str, str]:
    """The quantizer -> tensor map of an FP32 ONNX file.

    Uses quantlab's recorded map when the file was exported by quantlab, else
    matches nodes to ``module_names`` (exporter scopes, weight names).
    """
    from quantlab.export.graph import GraphView, load_onnx
    from quantlab.export.mapping import build_tensor_map, read_tensor_map

    model = load_onnx(onnx_path)
    recorded = read_tensor_map(model)
    if recorded:
        return recorded
    if not module_names:
        return {}
    view = GraphView(model)
    return build_tensor_map(view, module_names, quantized=False)


def write_calibration_cache(
    scales: Union[Scales, str, Path],
    onnx_path: Union[str, Path],
    out: Union[str, Path],
    *,
    trt_version: Union[str, int],
    algorithm: str = DEFAULT_ALGORITHM,
    strict: bool = True,
) -> Tuple[Path, CalibrationCache]:
    """Writes ``out`` from a scales file and the FP32 ONNX graph the cache is for.

    Also writes ``<out>.json`` (:func:`cache_sidecar`): the header, which
    calibrator and algorithms chose the scales, and :func:`header_note`.

    Raises:
        OutputPathError: ``out`` is an input, a folder, or an existing file that is not a cache.
        ScalesFormatError / FileNotFoundError / OnnxFormatError: unreadable inputs.
        TensorMappingError: scales that do not match the graph.
    """
    from quantlab.outputs import CACHE_SIDECAR, CALIBRATION_CACHE, check_output_file

    # Before any work: the cache never replaces its inputs (``--out`` = ``--onnx`` replaced the model).
    inputs = {"--onnx": onnx_path, "--scales": None if isinstance(scales, Scales) else scales}
    check_output_file(out, label="--out", replace=CALIBRATION_CACHE, inputs=inputs)
    check_output_file(f"{out}.json", label="--out's sidecar", replace=CACHE_SIDECAR, inputs=inputs)
    if not isinstance(scales, Scales):
        scales = Scales.load(scales)
    modules = sorted({e.module for e in scales.entries})
    tensor_map = tensor_map_from_onnx(onnx_path, modules)
    if not tensor_map:
        raise TensorMappingError(f"{onnx_path}: no layer of the scales file could be located in this ONNX graph")
    _check_tensors_exist(onnx_path, tensor_map)
    cache = cache_from_scales(scales, tensor_map, trt_version=trt_version, algorithm=algorithm, strict=strict)
    path = cache.save(out)
    write_text_atomic(f"{path}.json", json.dumps(cache_sidecar(cache, scales, onnx_path), indent=1))
    return path, cache


def cache_calibrator(cache_path: Union[str, Path]) -> Optional[str]:
    """The calibrator recorded in ``<cache>.json`` (None when absent or unreadable: e.g. TensorRT's own cache)."""
    try:
        with open(f"{cache_path}.json", encoding="utf-8") as fh:
            data = json.loads(fh.read(1 << 20))
        name = data["scales_from"]["calibrator"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name.isidentifier() else None


def cache_sidecar(cache: CalibrationCache, scales: Scales, onnx_path: Union[str, Path]) -> Dict[str, object]:
    """The cache's metadata: its header, where its scales came from, and why the header may name another algorithm."""
    algorithms = list(scales.config.algorithms) if scales.config is not None else []
    return {
        "format": "quantlab.calibration_cache",
        "version": 1,
        "header": cache.header,
        "trt_version": cache.version,
        "header_algorithm": cache.algorithm,
        "scales_from": {"calibrator": scales.calibrator, "calibrator_params": dict(scales.calibrator_params),
                        "algorithms": algorithms, "float_layers": list(scales.float_layers)},
        "onnx": str(onnx_path),
        "tensors": len(cache.scales),
        "note": header_note(cache.algorithm, scales.calibrator),
    }


def _check_tensors_exist(onnx_path: Union[str, Path], tensor_map: Mapping[str, str]) -> None:
    from quantlab.export.graph import load_onnx

    model = load_onnx(onnx_path, check=False)
    names = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    absent = sorted(v for k, v in tensor_map.items() if k.endswith(":input") and v not in names)
    if absent:
        raise TensorMappingError(f"{onnx_path}: the recorded tensor(s) {', '.join(absent[:5])} are not in this graph (file edited after export?)")


__all__ = [
    "ALGORITHMS",
    "CalibrationCache",
    "DEFAULT_ALGORITHM",
    "cache_calibrator",
    "cache_from_scales",
    "cache_sidecar",
    "header_note",
    "hex_to_scale",
    "read_calibration_cache",
    "scale_to_hex",
    "tensor_map_from_onnx",
    "trt_version_number",
    "write_calibration_cache",
]
