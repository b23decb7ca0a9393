"""Samples read with their spec and index attached to every error, and one input shape per dataset.

A batch stacks its samples, so one image of another size (or a gray image among
color ones) fails in ``torch.stack`` with no word of which file or sample it
was; a corrupt image fails in PIL the same way. :class:`CheckedDataset` reads
sample 0 when the data is opened (before any pass), then checks every sample
against it and names the spec, the sample index, the expected and the actual
shape.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from quantlab.data.errors import CorruptDataError, DataShapeError


def input_signature(sample: Any) -> Any:
    """The shapes of a sample's input part (``(input, target)`` samples: the input)."""
    value = sample[0] if isinstance(sample, (tuple, list)) and len(sample) == 2 else sample
    return _shapes(value)


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(_shapes(v) for v in value)
    return type(value).__name__


def _fix_hint(expected: Any, actual: Any) -> str:
    if isinstance(expected, tuple) and isinstance(actual, tuple) and len(expected) == len(actual) == 3:
        if expected[1:] != actual[1:]:
            return " (images of different sizes: resize them, e.g. load_data(..., image_size=(H, W)))"
        if expected[0] != actual[0]:
            return " (gray and color images mixed: load_data(..., image_mode=\"RGB\") or \"L\")"
    return ""


class CheckedDataset(Dataset):
    """``dataset`` with errors naming ``label`` and the sample, and one input shape for all samples.

    Args:
        dataset: A map-style dataset of samples.
        label: The data spec (for messages).
        same_shape: Check every sample's input shape against sample 0's.

    Raises:
        CorruptDataError / DataShapeError: at construction, if sample 0 is unreadable.
    """

    def __init__(self, dataset: Dataset, label: str, *, same_shape: bool = True) -> None:
        self.dataset = dataset
        self.label = label
        self.same_shape = same_shape
        self.expected: Optional[Any] = None
        if same_shape and len(dataset) > 0:
            self.expected = input_signature(self[0])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes (classes, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        try:
            sample = self.dataset[index]
        except (DataShapeError, CorruptDataError) as exc:
            raise type(exc)(f"{self.label}: sample {index}: {exc}") from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - PIL, datasets, numpy ...: the sample is unreadable
            raise CorruptDataError(f"{self.label}: sample {index} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
        if self.expected is not None:
            actual = input_signature(sample)
            if actual != self.expected:
                raise DataShapeError(
                    f"{self.label}: sample {index} has input shape {actual}, but sample 0 has {self.expected}: "
                    f"the samples of a batch must have one shape{_fix_hint(self.expected, actual)}"
                )
        return sample


__all__ = ["CheckedDataset", "input_signature"]
