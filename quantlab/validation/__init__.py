"""Validation of everything quantlab reads: bounded JSON, typed fields, ranges and scales, document schemas.

    from quantlab.validation import read_json_file, check_scales, check_amax, check_scale

* :mod:`~quantlab.validation.json_file`: size and nesting bounded before parsing; no duplicate keys, no NaN.
* :mod:`~quantlab.validation.fields`: exact JSON types (``true`` is not a number) with bounds.
* :mod:`~quantlab.validation.numeric`: amax and scale bounds (finite, > 0, normal float32/float16 scale).
* :mod:`~quantlab.validation.schemas`: one checker per document (scales, run.json, cache map, ...).

Every check raises the reader's own error type (a :class:`quantlab.errors.FileFormatError`
subclass) naming the file and field; nothing else escapes a reader.
"""
from quantlab.validation.fields import Fields, check_number, is_int, is_number, type_name
from quantlab.validation.json_file import MAX_BYTES, MAX_DEPTH, nesting_depth, parse_json_text, read_json_file
from quantlab.validation.numeric import (
    CONFIG_NUM_BITS,
    TENSORRT_NUM_BITS,
    check_amax,
    check_num_bits,
    check_scale,
    effective_scale,
    scale_problem,
)
from quantlab.validation.schemas import (
    check_calibration_summary,
    check_qat_manifest,
    check_qat_run,
    check_quant_config,
    check_results,
    check_run_info,
    check_scales,
    check_sensitivity,
    check_tensor_map,
)

__all__ = [
    "CONFIG_NUM_BITS",
    "Fields",
    "MAX_BYTES",
    "MAX_DEPTH",
    "TENSORRT_NUM_BITS",
    "check_amax",
    "check_calibration_summary",
    "check_num_bits",
    "check_number",
    "check_qat_manifest",
    "check_qat_run",
    "check_quant_config",
    "check_results",
    "check_run_info",
    "check_scale",
    "check_scales",
    "check_sensitivity",
    "check_tensor_map",
    "effective_scale",
    "is_int",
    "is_number",
    "nesting_depth",
    "parse_json_text",
    "read_json_file",
    "scale_problem",
    "type_name",
]
