"""Device names checked before any work: ``banana`` and ``cuda:7`` on a 1-GPU machine fail in one line."""
from __future__ import annotations


def check_device(text: str) -> str:
    """Returns ``text`` if it names a device torch knows and this machine has.

    Raises:
        ValueError: naming the device and what exists.
    """
    import torch

    name = str(text).strip()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{text!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}: this machine has no CUDA device usable by PyTorch (torch {torch.__version__}); use cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"{name}: MPS is not available on this machine; use cpu")
    elif device.type not in ("cpu", "meta"):
        available = getattr(getattr(torch, device.type, None), "is_available", None)
        if not callable(available) or not available():
            raise ValueError(f"{name}: no {device.type} device is available on this machine; use cpu")
    if device.type == "meta":
        raise ValueError("meta is not a device that computes: use cpu or cuda")
    return name


__all__ = ["check_device"]
