"""A failed CUDA-graph capture must not break the caller's random numbers or stream afterwards.

``CUDAGraph.capture_begin`` puts the device's default generator into capture mode, and
only a successful ``capture_end`` takes it out: when the capture is invalidated (a host
sync, an unsupported op), ``cudaStreamEndCapture`` fails first and the generator stays
in capture mode, so every later eager ``torch.randn``/dropout on that device raises
"Offset increment outside graph capture encountered unexpectedly" (torch 2.11, seen on
an H200). ``torch.cuda.graph`` also leaves its capture stream current when
``capture_end`` fails. quantlab tries captures and falls back to eager code (statistics
pass, ``qat.graphed`` and the QAT loop, AdaRound, the cuSPARSELt timing), so each
capture runs inside :func:`state_kept_on_failure`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch


@contextlib.contextmanager
def state_kept_on_failure(device: Optional[Union[torch.device, str, int]] = None) -> Iterator[None]:
    """Puts back the device's default generator and current stream if the block (a capture) raises.

    Generator: the state cloned before the block (seed and offset; not in capture mode)
    replaces the generator's state on failure, so eager code draws the same numbers it
    would have drawn had no capture been tried.

    Stream: ``torch.cuda.graph``'s ``__exit__`` calls ``capture_end`` before it leaves its
    capture stream: when the capture failed, ``capture_end`` raises and the capture
    stream stays the current stream, so every later eager kernel would run on it
    instead of the stream the caller was on (no longer ordered with that stream's
    work). ``torch.cuda.make_graphed_callables`` captures that way.

    On success nothing is touched.

    Args:
        device: The CUDA device whose default generator a capture registers (the current
            device when None or an index-less ``cuda``).
    """
    index = _device_index(device)
    generator = torch.cuda.default_generators[index]
    saved = generator.clone_state()
    stream = torch.cuda.current_stream(index)
    try:
        yield
    except BaseException:
        generator.graphsafe_set_state(saved)
        torch.cuda.set_stream(stream)
        raise


def _device_index(device: Optional[Union[torch.device, str, int]]) -> int:
    if isinstance(device, int):
        return device
    if device is not None:
        device = torch.device(device)
        if device.index is not None:
            return device.index
    return torch.cuda.current_device()
