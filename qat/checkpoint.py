"""Training checkpoints for the built-in QAT loop: atomic, rank 0 writes, safe to load.

A checkpoint holds everything needed to continue the SAME run: model state
(including ranges and folded-BN counters), optimizer, LR scheduler, the step,
and every rank's RNG states. It is a dict of tensors and plain Python values,
loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from quantlab._io import atomic_path
from quantlab.qat.errors import QATError
from quantlab.validation.fields import is_number

FORMAT_NAME = "quantlab.qat.checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> Dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy) as safe-to-load values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def save_checkpoint(path: Union[str, Path], payload: Dict[str, Any]) -> Path:
    """Writes ``payload`` atomically (a crash mid-write leaves the previous checkpoint intact)."""
    path = Path(path)
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: Union[str, Path], map_location: Optional[Union[str, torch.device]] = "cpu") -> Dict[str, Any]:
    """Reads a checkpoint with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise QATError(f"{path}: no checkpoint to resume from")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt/foreign file: name it
        raise QATError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise QATError(f"{path}: not a quantlab QAT checkpoint")
    version = payload.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise QATError(f"{path}: checkpoint version {version!r} is not one this quantlab reads (1..{FORMAT_VERSION})")
    return payload


def check_resume_payload(payload: Dict[str, Any], path: Union[str, Path], total_steps: int) -> int:
    """Checks the fields the loop resumes from (the file may be damaged or edited); returns the step.

    Args:
        payload: From :func:`load_checkpoint`.
        path: The file, for messages.
        total_steps: The schedule's length: a checkpoint is written at a step in ``0..total_steps``.

    Raises:
        QATError: one line naming the file and the field: a missing or mistyped field, a step
            outside the schedule, losses that are not one finite number per step, NaN/Inf weights.
    """

    def fail(message: str) -> QATError:
        return QATError(f"{path}: {message}")

    for key in ("model", "optimizer", "scheduler", "schedule"):
        if not isinstance(payload.get(key), dict):
            raise fail(f"{key} must be a dict, got {type(payload.get(key)).__name__}: the checkpoint is damaged")
    step = payload.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total_steps:
        raise fail(f"step must be an integer in 0..{total_steps} (the schedule's steps), got {step!r}"[:300])
    if "losses" in payload:  # one per step, carried into the resumed run's record
        losses = payload["losses"]
        if not isinstance(losses, list) or len(losses) != step or not _finite_numbers(losses):
            shown = f"{len(losses)} value(s)" if isinstance(losses, list) else type(losses).__name__
            raise fail(f"losses must be one finite number per step ({step}), got {shown}")
    scheduler = payload["scheduler"]
    if scheduler.get("last_epoch") != step or not isinstance(scheduler.get("base_lrs"), list) \
            or not _finite_numbers(scheduler["base_lrs"]):
        raise fail(f"scheduler must hold last_epoch = step ({step}) and finite base_lrs, got last_epoch "
                   f"{scheduler.get('last_epoch')!r}, base_lrs {scheduler.get('base_lrs')!r}"[:300])
    if not isinstance(payload.get("rng", []), list):
        raise fail(f"rng must be a list (one state per rank), got {type(payload.get('rng')).__name__}")
    for name, tensor in payload["model"].items():  # (a module's _extra_state may be any value: load_state_dict takes it)
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise fail(f"model[{name!r}] holds NaN/Inf values: the checkpoint is damaged"[:300])
    return step


def _finite_numbers(values: list) -> bool:
    """Every value a finite int or float (not a bool)."""
    return all(is_number(v) and math.isfinite(v) for v in values)
