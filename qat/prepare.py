"""prepare / save / load: turn a model into a QAT model and back into deployable artifacts.

    model = qat.prepare(model, scales="runs/x/scales.entropy.json")  # or data=loader
    ...  # any training loop
    qat.save(model, "runs/x-qat")    # scales.json + model.pt (FP weights) + qat.json
    model = qat.load(build_model(), "runs/x-qat")                     # ready to export
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from quantlab._io import atomic_path, write_text_atomic
from quantlab.api import current_scales, load_scales, quantize
from quantlab.attach import get_config, is_quantized, iter_quantizers, original_weight, remove_quantizers, replace_quantizer
from quantlab.batching import forward_loop
from quantlab.config import QuantConfig, int8_config
from quantlab.functional import amax_of_weight
from quantlab.pipeline import run as run_pipeline
from quantlab.qat import bn_fold, ddp
from quantlab.qat.errors import QATError
from quantlab.qat.quantizer import WEIGHT_RANGES, QATQuantizer
from quantlab.scales import Scales
from quantlab.validation import check_qat_manifest, read_json_file
from quantlab.tensor_quantizer import QuantizerMode, Role

_OPTIONS_ATTR = "_quantlab_qat"
FORMAT_NAME = "quantlab.qat"
FORMAT_VERSION = 1
SCALES_FILE = "scales.json"
WEIGHTS_FILE = "model.pt"
MANIFEST_FILE = "qat.json"


@dataclasses.dataclass(frozen=True)
class QATOptions:
    """How a model was prepared for QAT (kept on the model and written by :func:`save`)."""

    learn_amax: bool = False
    weight_ranges: str = "recompute"
    fold_bn: bool = False
    freeze_bn_after: Optional[int] = None
    calibrator: str = ""
    folded: Tuple[Tuple[str, str], ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["folded"] = [list(p) for p in self.folded]
        return data


def qat_options(model: nn.Module) -> Optional[QATOptions]:
    """The options ``model`` was prepared with, or None if it was not prepared."""
    return ddp.unwrap(model).__dict__.get(_OPTIONS_ATTR)


def is_prepared(model: nn.Module) -> bool:
    return qat_options(model) is not None


def prepare(
    model: nn.Module,
    scales: Union[str, Path, Scales, None] = None,
    data: Optional[Iterable[Any]] = None,
    *,
    calibrator: str = "entropy",
    calibrator_params: Optional[Dict[str, Any]] = None,
    config: Optional[QuantConfig] = None,
    max_batches: Optional[int] = None,
    learn_amax: bool = False,
    weight_ranges: str = "recompute",
    fold_bn: Union[bool, Sequence[Tuple[str, str]]] = False,
    freeze_bn_after: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> nn.Module:
    """Makes ``model`` ready for quantization-aware training, in place, and returns it.

    The starting ranges come from a scales file (any calibrator), from
    calibration ``data`` (one statistics pass, merged across ranks under DDP),
    or from quantizers the model already holds (e.g. after ``quantlab.quantize``
    with a forward loop). Under DDP every rank ends with rank 0's ranges.

    Call it before building the optimizer (learned ranges are new parameters)
    and before wrapping the model in DistributedDataParallel.

    Args:
        model: The FP32 model (or one quantlab already quantized).
        scales: Scales path or object to start from.
        data: Calibration batches, used when ``scales`` is None.
        calibrator: Calibrator for ``data`` (default entropy).
        calibrator_params: Its parameters (e.g. ``{"percentile": 99.99}``).
        config: Quantization config for ``data`` (default :func:`quantlab.int8_config`).
        max_batches: Calibrate on at most this many batches.
        learn_amax: Learn activation ranges with the LSQ gradient.
        weight_ranges: ``"recompute"`` (max of the current weights, every step),
            ``"learn"`` (LSQ, per channel if the config is) or ``"fixed"``.
        fold_bn: Fold BatchNorm into the preceding conv (True: every Conv->BN pair
            found by tracing; or an explicit list of ``(conv, bn)`` names).
        freeze_bn_after: Freeze BatchNorm statistics after this many training
            steps (forward passes in train mode) of the folded modules. When
            fine-tuning a converged model (the usual QAT), 0 is the recommended
            value: with live batch statistics the folded weights follow batch
            noise, and a depthwise-separable net recovered 29% of its PTQ loss in
            one epoch that way against 78% with frozen statistics
            (benchmarks/RESULTS.md). None keeps them live.
        progress: Called with the number of calibration batches done.

    Returns:
        ``model``, fake-quantizing with QAT quantizers.

    Raises:
        QATError: bad option, already prepared, wrapped in DDP, or nothing to start from.
        ScalesMismatchError: the scales do not match the model (names every layer).
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise QATError("prepare the model before wrapping it in DistributedDataParallel (pass model.module)")
    from quantlab.graph_models import CAPTURED_ATTR

    if hasattr(model, CAPTURED_ATTR):
        raise QATError(
            f"{getattr(model, CAPTURED_ATTR)}: an exported program or TorchScript model is captured in inference mode "
            "(BatchNorm uses running statistics, no train mode): QAT needs the trainable Python model "
            "(--model file.py:factory --weights state_dict.pt); calibrate, compare and export work on this file"
        )
    if weight_ranges not in WEIGHT_RANGES:
        raise QATError(f"weight_ranges must be one of {', '.join(WEIGHT_RANGES)}, got {weight_ranges!r}")
    if freeze_bn_after is not None and freeze_bn_after < 0:
        raise QATError(f"freeze_bn_after must be >= 0, got {freeze_bn_after}")
    if is_prepared(model):
        raise QATError(f"{type(model).__name__} is already prepared for QAT")
    if scales is None and data is None and not _has_ranges(model):
        raise QATError("prepare needs starting ranges: pass scales=<file or Scales> or data=<calibration loader>")
    if isinstance(scales, (str, Path)):
        scales = Scales.load(scales)  # ScalesFormatError names the file

    was_quantized = is_quantized(model)
    folded: Tuple[Tuple[str, str], ...] = ()
    if fold_bn:
        if is_quantized(model):
            raise QATError("fold_bn needs the FP32 model: pass the model without quantizers and the scales file")
        pairs = bn_fold.fold_conv_bn(model, None if fold_bn is True else list(fold_bn), freeze_bn_after=freeze_bn_after)
        folded = tuple((c, b) for c, b in pairs)
    try:
        source = _start_ranges(model, scales, data, calibrator, calibrator_params, config, max_batches, progress)
    except BaseException:  # leave the caller's model as it was
        if not was_quantized and is_quantized(model):
            remove_quantizers(model)
        if folded:
            bn_fold.undo_fold(model)
        raise
    ddp.broadcast_ranges(model)
    _install_qat_quantizers(model, learn_amax=learn_amax, weight_ranges=weight_ranges)
    options = QATOptions(
        learn_amax=learn_amax,
        weight_ranges=weight_ranges,
        fold_bn=bool(folded),
        freeze_bn_after=freeze_bn_after,
        calibrator=source,
        folded=folded,
    )
    model.__dict__[_OPTIONS_ATTR] = options
    return model


def _has_ranges(model: nn.Module) -> bool:
    refs = list(iter_quantizers(model))
    return bool(refs) and all(r.quantizer.is_calibrated for r in refs if r.quantizer.mode is QuantizerMode.QUANTIZE) and any(
        r.quantizer.mode is QuantizerMode.QUANTIZE for r in refs
    )


def _start_ranges(model, scales, data, calibrator, calibrator_params, config, max_batches, progress) -> str:
    """Loads or computes the starting ranges; returns the calibrator they came from."""
    if scales is not None:
        if config is not None and not is_quantized(model):
            quantize(model, config)
        load_scales(model, scales, strict=True)
        return scales.calibrator
    if data is not None:
        # The PTQ pipeline; under DDP with the process group: every rank then holds the statistics
        # of all shards and the same ranges (a failure on one rank stops all).
        run_pipeline(model, forward_loop(data, max_batches=max_batches, progress=progress),
                     {calibrator: dict(calibrator_params or {})}, config=config or int8_config(calibrator),
                     group=ddp.world_group())
        return calibrator
    return getattr(current_scales(model), "calibrator", "") or "current"


def _install_qat_quantizers(model: nn.Module, *, learn_amax: bool, weight_ranges: str) -> None:
    for ref in list(iter_quantizers(model)):
        q = ref.quantizer
        active = q.mode is QuantizerMode.QUANTIZE and q.is_calibrated
        if ref.role is Role.INPUT:
            new = QATQuantizer(q, learn=learn_amax and active)
        else:
            new = QATQuantizer(q, learn=weight_ranges == "learn" and active, recompute=weight_ranges == "recompute")
            if bn_fold.is_folded(ref.module):
                # The file's weight ranges are for the unfolded weights: start from the folded ones.
                with torch.no_grad():
                    new.set_amax(amax_of_weight(ref.module.folded_weight(), new.spec))
        replace_quantizer(ref.module, ref.role, new)


def refresh_weight_ranges(model: nn.Module) -> None:
    """Recomputes every "recompute" weight range from the current weights (after the last step)."""
    for ref in iter_quantizers(ddp.unwrap(model)):
        q = ref.quantizer
        if ref.role is Role.WEIGHT and getattr(q, "recompute_amax", False):
            w = ref.module.folded_weight() if bn_fold.is_folded(ref.module) else original_weight(ref.module)
            q.set_amax(amax_of_weight(w.detach(), q.spec))


def deployable_state(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Scales]:
    """The QAT model as deployable artifacts: a state_dict of the original architecture and its ranges.

    The state_dict has no quantizer entries, floating-point weights, and every
    BatchNorm folded for QAT baked into its conv (see
    :func:`quantlab.qat.bn_fold.baked_state`), so the scales' weight ranges
    describe exactly the weights in it. Tensors are detached CPU copies.
    """
    model = ddp.unwrap(model)
    options = qat_options(model)
    refresh_weight_ranges(model)
    scales = current_scales(model, calibrator="qat", calibrator_params=(options.to_dict() if options else {}))
    scales = dataclasses.replace(scales, config=get_config(model))
    folded = {name: m for name, m in bn_fold.folded_modules(model)}
    state: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        parts = key.split(".")
        if "input_quantizer" in parts or parts[-1] == "_extra_state":
            continue
        if "parametrizations" in parts:
            i = parts.index("parametrizations")
            if parts[i + 2] != "original":
                continue  # a weight quantizer's amax
            key = ".".join(parts[:i] + [parts[i + 1]])
        owner = next((n for n in folded if key.startswith(f"{n}.bn.")), None)
        if owner is not None:
            continue  # the folded BatchNorm: written back under its own name below
        state[key] = value
    for name, module in folded.items():
        prefix = f"{name}." if name else ""
        state.update(bn_fold.baked_state(module, prefix, f"{module.bn_name}."))
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return state, scales


def save(model: nn.Module, out_dir: Union[str, Path]) -> Dict[str, Path]:
    """Writes what export needs: ``scales.json``, ``model.pt`` (FP weights) and ``qat.json``.

    ``model.pt`` is a plain state_dict of the original architecture (BatchNorms
    folded for QAT are baked in), loadable with ``torch.load(weights_only=True)``
    into the user's model class; ``quantlab.load_scales`` then gives the INT8 model.
    Every file is written atomically; ``qat.json`` comes last and lists the others.

    Returns:
        The written paths by role (``scales``, ``weights``, ``manifest``).
    """
    out = Path(out_dir)
    model = ddp.unwrap(model)
    options = qat_options(model)
    state, scales = deployable_state(model)
    weights_path = out / WEIGHTS_FILE
    with atomic_path(weights_path) as tmp:
        torch.save(state, tmp)
    scales_path = scales.save(out / SCALES_FILE)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": type(model).__name__,
        "options": options.to_dict() if options else None,
        "scales": SCALES_FILE,
        "weights": WEIGHTS_FILE,
        "num_tensors": len(state),
    }
    manifest_path = write_text_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=1))
    return {"scales": scales_path, "weights": weights_path, "manifest": manifest_path}


def load(model: nn.Module, out_dir: Union[str, Path], *, strict: bool = True) -> nn.Module:
    """Loads a :func:`save` folder into a fresh instance of the model class, in place.

    Returns the model fake-quantizing with the QAT ranges (ready to evaluate or export).

    Raises:
        QATError: the folder is not a QAT save (names the missing or bad file).
        ScalesMismatchError: the scales do not fit the model.
    """
    out = Path(out_dir)
    manifest_path = out / MANIFEST_FILE
    if not manifest_path.is_file():
        raise QATError(f"{manifest_path}: not found; is {out} a folder written by quantlab.qat.save?")
    manifest = read_json_file(manifest_path, what="QAT manifest", error=QATError)
    check_qat_manifest(manifest, str(manifest_path), format_name=FORMAT_NAME, max_version=FORMAT_VERSION, error=QATError)
    weights_path = out / str(manifest.get("weights", WEIGHTS_FILE))
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise QATError(f"{weights_path}: weights file not found") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file: name it
        raise QATError(f"{weights_path}: cannot read the weights ({exc})") from None
    if is_quantized(model):
        raise QATError("load() needs a fresh (unquantized) instance of the model class")
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise QATError(f"{weights_path} does not fit {type(model).__name__}: {exc}") from None
    return load_scales(model, out / str(manifest.get("scales", SCALES_FILE)), strict=strict)


def convert(model: nn.Module, target: nn.Module) -> nn.Module:
    """Moves the QAT result into ``target``, a fresh instance of the original model class.

    In memory what :func:`save` + :func:`load` do through files: ``target`` gets
    the deployable weights (folded BatchNorms baked in) and the QAT ranges, and
    fake-quantizes with fixed ranges, ready for ``quantlab.export``.
    """
    state, scales = deployable_state(model)
    if is_quantized(target):
        raise QATError("convert() needs a fresh (unquantized) instance of the model class")
    target.load_state_dict(state)
    return load_scales(target, scales)
