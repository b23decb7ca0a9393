"""Run-time CUDA kernels of the batched calibrators, compiled once per device with NVRTC.

PyTorch's CUDA builds ship ``torch.cuda._compile_kernel``; where it is missing or a
kernel fails to compile, :func:`compiled` returns None and the caller runs its torch-op
form instead (the same choices, more launches).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

_LOG = logging.getLogger(__name__)
_COMPILED: Dict[Tuple[str, int], Any] = {}  # (kernel name, device index) -> kernel, or None where it failed
_LOCK = threading.Lock()


def compiled(source: str, name: str, device: torch.device) -> Optional[Any]:
    """Kernel ``name`` of ``source`` compiled for ``device`` (a CUDA device), or None where it cannot be."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (name, index)
    with _LOCK:
        if key not in _COMPILED:
            try:
                with torch.cuda.device(index):
                    _COMPILED[key] = torch.cuda._compile_kernel(source, name)
            except Exception as error:  # noqa: BLE001 - no NVRTC, an old PyTorch: the torch ops run instead
                _LOG.debug("kernel %s unavailable on cuda:%d (%s); using torch ops", name, index, error)
                _COMPILED[key] = None
        return _COMPILED[key]


def kernel_args(tensors: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]) -> Optional[List[torch.Tensor]]:
    """``tensors`` made contiguous for a kernel's pointer arguments, or None if one has another dtype."""
    if any(t.dtype != dtype for t, dtype in zip(tensors, dtypes)):
        return None
    return [t.contiguous() for t in tensors]


def launch(kernel: Any, device: torch.device, blocks: int, threads: int, args: list) -> None:
    """Launches ``kernel`` on ``device``'s current stream (the stream the torch ops around it use)."""
    with torch.cuda.device(device):
        kernel(grid=(blocks, 1, 1), block=(threads, 1, 1), args=args, stream=torch.cuda.current_stream(device))
