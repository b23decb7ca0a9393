"""Training checkpoints for the built-in QAT loop: atomic, rank 0 writes, safe to load.

A checkpoint holds everything needed to continue the SAME run: model state
(including ranges and folded-BN counters), optimizer, LR scheduler, the step,
and every rank's RNG states. It is a dict of tensors and plain Python values,
loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from quantlab._io import atomic_path
from quantlab.qat.errors import QATError

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
    if int(payload.get("version", 0)) > FORMAT_VERSION:
        raise QATError(f"{path}: checkpoint version {payload.get('version')} is newer than this quantlab reads")
    return payload
