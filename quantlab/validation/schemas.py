"""The schema of every JSON document quantlab reads back, checked field by field.

One function per document; each raises the caller's error type (a
:class:`quantlab.errors.FileFormatError` subclass) naming the file and field,
and returns nothing: the readers build their objects only from checked data.

==========================  ==========================================  ========================
document                    reader                                      function
==========================  ==========================================  ========================
scales file                 ``Scales.load`` / ``from_dict``             :func:`check_scales`
a quantization config       scales files, checkpoints, ``run.json``     :func:`check_quant_config`
compare ``run.json``        ``jobs.runs.load_run_info``                 :func:`check_run_info`
compare ``results.json``    ``jobs.runs.read_results``                  :func:`check_results`
QAT ``run.json``            ``qat.run.run_qat(resume=True)``            :func:`check_qat_run`
QAT ``qat.json``            ``qat.load``                                :func:`check_qat_manifest`
``calibration.json``        ``runs`` / readers of calibrate folders     :func:`check_calibration_summary`
``sensitivity.<c>.json``    autoprecision, report                      :func:`check_sensitivity`
ONNX ``quantlab.tensor_map`` ``export.mapping.read_tensor_map``         :func:`check_tensor_map`
==========================  ==========================================  ========================
"""
from __future__ import annotations

from typing import Any, Type

from quantlab.errors import FileFormatError
from quantlab.validation.fields import Fields, check_number, is_int, type_name
from quantlab.validation.numeric import check_amax, check_num_bits

#: Histogram bins a statistics entry may declare (quantlab uses 2048; 1M bounds a mutated file's allocation).
MAX_BINS = 1 << 20
PRECISIONS = ("fp32", "fp16", "int8")
ROLES = ("input", "weight")


def _is_plain_name(value: str) -> bool:
    """Not empty, not ``.``/``..``, no path separator or NUL: a name that stays inside its folder."""
    return bool(value) and value not in (".", "..") and not any(c in value for c in "/\\\x00")


def _plain_file_name(value: str, where: str, error: Type[Exception]) -> str:
    """A file name inside the folder (no separators, no ``..``): a manifest must not point elsewhere."""
    if not _is_plain_name(value):
        raise error(f"{where} must be a plain file name inside the folder, got {value!r}")
    return value


def _name_part(value: Any, where: str, error: Type[Exception]) -> None:
    """A calibrator name or row source: the run's file names are built from it (``scales.<calibrator>.<source>.json``,
    ``autoprecision.<calibrator>/``), so a separator would point them outside the run folder."""
    if value is not None and not _is_plain_name(value):
        raise error(f"{where} must be a name (no path separators), got {value!r}"[:300])


# -- quantization config (inside scales files, checkpoints and compare run.json) --------------------
def _check_quantizer_spec(raw: Any, where: str, error: Type[Exception]) -> None:
    f = Fields(raw, where, error)
    check_num_bits(raw.get("num_bits", 8), where, error)
    f.boolean("narrow_range")
    f.boolean("per_channel")
    f.integer("axis", low=-8, high=8)


def _check_json_value(value: Any, where: str, error: Type[Exception], depth: int = 0) -> None:
    """A parameter value: text, true/false, null, a finite number, or a list/object of them."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, (list, dict)) and depth < 4:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            _check_json_value(item, f"{where}[{key!r}]", error, depth + 1)
        return
    check_number(value, where, error=error)


def check_quant_config(raw: Any, where: str, error: Type[Exception] = FileFormatError) -> None:
    """A :class:`quantlab.config.QuantConfig` as ``to_dict`` writes it: every field's type and bounds.

    (``QuantConfig.from_dict`` refuses unknown fields and newer versions; it trusts the types.)
    """
    f = Fields(raw, where, error)
    f.integer("version", low=1)
    for role in ROLES:
        spec = raw.get(role)
        if spec is not None:
            _check_quantizer_spec(spec, f"{where}: {role}", error)
    f.strings("include")
    f.strings("exclude")
    f.string("calibrator", max_len=200)
    params = f.obj("calibrator_params") or {}
    for key, value in params.items():
        _check_json_value(value, f"{where}: calibrator_params[{key!r}]", error)
    f.integer("num_bins", low=128, high=MAX_BINS)
    for i, name in enumerate(f.strings("algorithms") or []):
        if not name.strip() or len(name) > 200:
            raise error(f"{where}: algorithms[{i}] must be an algorithm name, got {name[:200]!r}")
    algorithm_params = f.obj("algorithm_params") or {}
    for name, values in algorithm_params.items():
        if not isinstance(values, dict):
            raise error(f"{where}: algorithm_params[{name!r}] must be an object, got {type_name(values)}")
        for key, value in values.items():
            _check_json_value(value, f"{where}: algorithm_params[{name!r}][{key!r}]", error)


# -- scales -----------------------------------------------------------------------------------------
def check_quantizer_entry(raw: Any, where: str, error: Type[Exception] = FileFormatError) -> None:
    """One entry of a scales file's ``quantizers`` list."""
    f = Fields(raw, where, error)
    f.string("module", required=True, nullable=False, max_len=4096)
    role = f.string("role", required=True, nullable=False, choices=ROLES)
    num_bits = check_num_bits(raw.get("num_bits", 8), where, error)
    f.boolean("narrow_range")
    axis = f.integer("axis", low=-8, high=8)
    amax = raw.get("amax")
    if "amax" not in raw:
        raise error(f"{where}: amax is missing")
    if isinstance(amax, list) and axis is None:
        raise error(f"{where}: a per-channel amax list needs an integer axis")
    check_amax(amax, where, role=role, num_bits=num_bits, error=error)


def check_statistics_entry(raw: Any, where: str, error: Type[Exception] = FileFormatError) -> None:
    """One histogram of a scales file's ``statistics`` object."""
    f = Fields(raw, where, error)
    f.number("bin_width", required=True, nullable=False, positive=True)
    f.number("amax", required=True, nullable=False, low=0.0)
    num_bins = f.integer("num_bins", required=True, nullable=False, low=1, high=MAX_BINS)
    counts = f.array("counts", required=True, nullable=False, max_len=num_bins)
    for i, count in enumerate(counts):
        if not is_int(count) or not 0 <= count < 1 << 62:
            raise error(f"{where}: counts[{i}] must be an integer in 0..2^62, got {type_name(count)} {count!r}"[:200])


def check_scales(data: Any, where: str, *, format_name: str, max_version: int, error: Type[Exception] = FileFormatError) -> None:
    """A whole scales document (see :class:`quantlab.scales.Scales`)."""
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise error(f"{where}: not a quantlab scales file (missing \"format\": \"{format_name}\")")
    f = Fields(data, where, error)
    version = data.get("version")
    if not is_int(version) or not 1 <= version <= max_version:
        raise error(f"{where}: unsupported scales version {version!r} (this quantlab reads 1..{max_version})")
    f.string("created")
    f.string("model")
    calibrator = f.sub("calibrator")
    if calibrator is not None:
        calibrator.string("name", max_len=200)
        calibrator.obj("params")
    if f.obj("config") is not None:
        check_quant_config(data["config"], f"{where}: config", error)
    quantizers = f.array("quantizers") or []
    seen = set()
    for i, raw in enumerate(quantizers):
        entry_where = f"{where}: quantizers[{i}]"
        check_quantizer_entry(raw, entry_where, error)
        key = f"{raw['module']}:{raw['role']}"
        if key in seen:
            raise error(f"{entry_where}: '{key}' appears twice")
        seen.add(key)
    floats = f.strings("float_layers") or []
    if not quantizers and not floats:
        raise error(f"{where}: no quantizers in the scales file")
    statistics = f.obj("statistics") or {}
    for name, raw in statistics.items():
        check_statistics_entry(raw, f"{where}: statistics of '{name}'", error)
    algorithms = f.sub("algorithms")
    if algorithms is not None:
        for key in ("transforms", "refinements"):
            for i, report in enumerate(algorithms.array(key) or []):
                r = Fields(report, f"{where}: algorithms: {key}[{i}]", error)
                r.string("name", required=True, nullable=False, non_empty=True, max_len=200)
                r.string("stage", max_len=50)
                r.obj("details")


# -- run folders ------------------------------------------------------------------------------------
def check_run_info(data: Any, where: str, error: Type[Exception] = FileFormatError) -> None:
    """A compare run folder's ``run.json``."""
    f = Fields(data, where, error)
    f.string("run_id", max_len=200)
    f.string("store", max_len=4096)
    f.string("kind", choices=("compare",))
    for key in ("model", "data", "eval_data", "weights", "device", "name"):
        f.string(key, max_len=4096)
    f.string("metric", required=True, nullable=False, non_empty=True, max_len=400)
    task = f.sub("task")
    if task is not None:
        task.string("name", max_len=200)
        task.obj("params")
    for i, name in enumerate(f.strings("calibrators") or []):
        _name_part(name, f"{where}: calibrators[{i}]", error)
    for i, name in enumerate(f.strings("algorithms") or []):  # the full pipeline's source, "ptq+<algorithm>+..."
        _name_part(name, f"{where}: algorithms[{i}]", error)
    precisions = f.strings("precisions") or []
    for p in precisions:
        if p not in PRECISIONS:
            raise error(f"{where}: precisions holds {p!r}; expected {', '.join(PRECISIONS)}")
    f.integer("eval_batches", low=0)
    f.integer("calib_batches", low=0)
    f.integer("layer_batches", low=0)
    f.integer("batch_size", low=1, high=1 << 24)
    f.obj("calibrator_params")
    if f.obj("quant_config") is not None:
        check_quant_config(data["quant_config"], f"{where}: quant_config", error)


def check_results(data: Any, where: str, error: Type[Exception] = FileFormatError) -> None:
    """A compare run folder's ``results.json``."""
    f = Fields(data, where, error)
    f.string("run_id", max_len=200)
    f.string("metric", max_len=400)
    f.boolean("higher_is_better")
    _name_part(f.string("best_calibrator", max_len=200), f"{where}: best_calibrator", error)
    _name_part(f.string("best_source", max_len=400), f"{where}: best_source", error)
    for i, row in enumerate(f.array("rows") or []):
        r = Fields(row, f"{where}: rows[{i}]", error)
        r.string("precision", required=True, nullable=False, choices=PRECISIONS)
        _name_part(r.string("calibrator", max_len=200), f"{where}: rows[{i}]: calibrator", error)
        # "ptq+cle+bias-correction+adaround": one per algorithm prefix
        _name_part(r.string("source", max_len=400), f"{where}: rows[{i}]: source", error)
        r.string("metric", required=True, nullable=False, max_len=400)
        r.number("value", finite=False, text_nonfinite=True)
        r.number("delta", finite=False, text_nonfinite=True)
        r.number("seconds", low=0.0, text_nonfinite=True)
        r.integer("n", low=0)
        for key in ("ci_low", "ci_high", "p_value"):
            r.number(key, finite=False, text_nonfinite=True)
        r.boolean("within_noise")
    # Output fidelity and deployment cost (issue 17): what the report shows of them is checked here.
    for name, numbers in (("fidelity", ("top1_agreement", "max_abs_error", "max_rel_error", "mean_cosine",
                                        "one_minus_cosine", "kl_divergence")),
                          ("deployment", ("latency_ms_min", "latency_ms_median", "size_mb"))):
        for i, row in enumerate(f.array(name) or []):
            r = Fields(row, f"{where}: {name}[{i}]", error)
            r.string("precision", required=True, nullable=False, choices=PRECISIONS)
            _name_part(r.string("calibrator", max_len=200), f"{where}: {name}[{i}]: calibrator", error)
            _name_part(r.string("source", max_len=50), f"{where}: {name}[{i}]: source", error)
            r.integer("n", low=0)
            r.integer("batch_size", low=1)
            for key in ("runtime", "label", "status", "note", "onnx_file", "onnx_sha256"):
                r.string(key, max_len=1000)
            for key in numbers:
                r.number(key, finite=False, text_nonfinite=True)
    f.string_map("scales")
    f.string_map("checkpoints")
    f.obj("statistics")
    layers = f.obj("layers") or {}
    for name, rows in layers.items():
        if not isinstance(rows, list):
            raise error(f"{where}: layers[{name!r}] must be a list, got {type_name(rows)}")


def check_sensitivity(data: Any, where: str, error: Type[Exception] = FileFormatError) -> None:
    """``sensitivity.<calibrator>.json`` (its layer order is what autoprecision reads)."""
    f = Fields(data, where, error)
    for i, entry in enumerate(f.array("layers", required=True, nullable=False)):
        Fields(entry, f"{where}: layers[{i}]", error).string("layer", required=True, nullable=False, max_len=4096)


def check_qat_run(data: Any, where: str, error: Type[Exception] = FileFormatError) -> None:
    """A QAT run folder's ``run.json`` (what ``--resume`` continues from)."""
    f = Fields(data, where, error)
    f.string("run_id", max_len=200)
    f.string("metric", required=True, nullable=False, non_empty=True, max_len=400)
    f.string("calibrator", max_len=200)
    f.number("fp32", required=True, nullable=False, finite=False)
    f.number("ptq", required=True, nullable=False, finite=False)
    f.number("qat", finite=False)
    seconds = f.sub("seconds")
    if seconds is not None:
        for key in ("fp32", "ptq", "qat"):
            seconds.number(key, low=0.0)
    f.integer("steps", low=0)
    f.number("train_seconds", low=0.0)
    f.number("final_loss", finite=False)
    f.integer("world_size", low=1)
    losses = f.array("losses")
    for i, loss in enumerate(losses or []):
        if loss is not None:
            check_number(loss, f"{where}: losses[{i}]", finite=False, error=error)


def check_qat_manifest(data: Any, where: str, *, format_name: str, max_version: int, error: Type[Exception] = FileFormatError) -> None:
    """``qat.json`` of a :func:`quantlab.qat.save` folder."""
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise error(f"{where}: not a quantlab QAT manifest")
    f = Fields(data, where, error)
    version = data.get("version")
    if not is_int(version) or not 1 <= version <= max_version:
        raise error(f"{where}: version {version!r} is not one this quantlab reads (1..{max_version})")
    for key in ("weights", "scales"):
        value = f.string(key, max_len=255)
        if value is not None:
            _plain_file_name(value, f"{where}: {key}", error)


def check_calibration_summary(data: Any, where: str, error: Type[Exception] = FileFormatError) -> None:
    """``calibration.json`` of a ``quantlab calibrate`` folder."""
    f = Fields(data, where, error)
    f.string("model", max_len=4096)
    f.string("data", max_len=4096)
    f.integer("num_batches", low=0)
    f.integer("world_size", low=1)
    f.number("statistics_seconds", low=0.0)
    seconds = f.obj("calibrate_seconds") or {}
    for name, value in seconds.items():
        check_number(value, f"{where}: calibrate_seconds[{name!r}]", low=0.0, error=error)
    f.string_map("scales")


def check_tensor_map(data: Any, where: str, error: Type[Exception] = FileFormatError) -> None:
    """quantlab's quantizer -> tensor map (ONNX metadata ``quantlab.tensor_map`` and the sidecar)."""
    if not isinstance(data, dict):
        raise error(f"{where}: the tensor map must be an object, got {type_name(data)}")
    for key, tensor in data.items():
        module, sep, role = key.rpartition(":")
        if not sep or not module or role not in ROLES:
            raise error(f"{where}: tensor map key {key[:80]!r} is not '<module>:input' or '<module>:weight'")
        if not isinstance(tensor, str) or not tensor:
            raise error(f"{where}: tensor of {key!r} must be a non-empty string, got {type_name(tensor)}")


__all__ = [
    "MAX_BINS",
    "check_calibration_summary",
    "check_qat_manifest",
    "check_qat_run",
    "check_quant_config",
    "check_quantizer_entry",
    "check_results",
    "check_run_info",
    "check_scales",
    "check_sensitivity",
    "check_statistics_entry",
    "check_tensor_map",
]
