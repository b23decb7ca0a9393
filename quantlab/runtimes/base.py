"""One small runner interface shared by PyTorch, ONNX Runtime and TensorRT.

A runner takes NumPy arrays (or torch tensors) by input name or position and
returns NumPy outputs; :meth:`Runner.run_dataset` evaluates top-1 accuracy over
``(inputs, labels)`` batches and :meth:`Runner.measure_latency` times one batch.
"""
from __future__ import annotations

import abc
import dataclasses
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from quantlab.errors import QuantlabError

Inputs = Union[np.ndarray, Sequence[np.ndarray], Mapping[str, np.ndarray], Any]


class RunnerError(QuantlabError):
    """A runner could not be created or could not run its inputs."""


@dataclasses.dataclass
class LatencyStats:
    """Latency of repeated runs of one batch (milliseconds)."""

    batch_size: int
    iterations: int
    median_ms: float
    mean_ms: float
    p90_ms: float
    min_ms: float

    @classmethod
    def from_samples(cls, samples_s: List[float], batch_size: int) -> "LatencyStats":
        ms = sorted(s * 1000.0 for s in samples_s)
        p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
        return cls(batch_size, len(ms), statistics.median(ms), statistics.fmean(ms), p90, ms[0])

    @property
    def samples_per_second(self) -> float:
        return 1000.0 * self.batch_size / self.median_ms if self.median_ms > 0 else float("inf")


@dataclasses.dataclass
class DatasetResult:
    """Outcome of :meth:`Runner.run_dataset`.

    Attributes:
        num_samples: Samples evaluated.
        num_batches: Batches evaluated.
        top1: Top-1 accuracy in percent (None without labels).
        seconds: Wall time of the loop (inference plus conversions).
        outputs: First outputs of every batch concatenated, when requested.
        predictions: Argmax of the first output per sample.
    """

    num_samples: int
    num_batches: int
    top1: Optional[float]
    seconds: float
    outputs: Optional[np.ndarray] = None
    predictions: Optional[np.ndarray] = None


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like as a NumPy array (on the CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


class Runner(abc.ABC):
    """Runs one model on one backend.

    Subclasses implement :meth:`run` and name their inputs/outputs.
    """

    #: Backend name ("torch", "onnxruntime", "tensorrt").
    backend: str = ""

    @property
    @abc.abstractmethod
    def input_names(self) -> List[str]:
        """Names of the model inputs, in order."""

    @property
    @abc.abstractmethod
    def output_names(self) -> List[str]:
        """Names of the model outputs, in order."""

    @abc.abstractmethod
    def run(self, inputs: Inputs) -> List[np.ndarray]:
        """Runs one batch; returns every output as a NumPy array."""

    def close(self) -> None:
        """Releases backend resources (sessions, engines)."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- shared helpers -------------------------------------------------------------------
    def feeds(self, inputs: Inputs) -> Dict[str, np.ndarray]:
        """Normalizes inputs to ``{input name: array}``."""
        names = self.input_names
        if isinstance(inputs, Mapping):
            unknown = sorted(set(inputs) - set(names))
            if unknown:
                raise RunnerError(f"unknown input(s) {unknown}; the model takes {names}")
            return {k: to_numpy(v) for k, v in inputs.items()}
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != len(names):
                raise RunnerError(f"{len(inputs)} inputs given, the model takes {len(names)}: {names}")
            return {n: to_numpy(v) for n, v in zip(names, inputs)}
        if len(names) != 1:
            raise RunnerError(f"one array given, the model takes {len(names)} inputs: {names}")
        return {names[0]: to_numpy(inputs)}

    def run_dataset(
        self,
        data: Iterable[Any],
        *,
        max_batches: Optional[int] = None,
        keep_outputs: bool = False,
        progress: Optional[Callable[[int], None]] = None,
    ) -> DatasetResult:
        """Runs every batch of ``data`` (``(inputs, labels)`` pairs or bare inputs).

        Top-1 compares the argmax of the first output with the labels.
        """
        from quantlab.batching import split_batch

        correct = total = batches = 0
        have_labels = True
        kept: List[np.ndarray] = []
        predictions: List[np.ndarray] = []
        start = time.perf_counter()
        for batch in data:
            if max_batches is not None and batches >= max_batches:
                break
            inputs, labels = split_batch(batch)
            if isinstance(inputs, Mapping):
                inputs = {k: v for k, v in inputs.items() if k != "labels" and k in self.input_names}
            first = self.run(inputs)[0]
            pred = first.reshape(first.shape[0], -1).argmax(axis=1)
            predictions.append(pred)
            if keep_outputs:
                kept.append(first)
            if labels is None:
                have_labels = False
            else:
                label_array = to_numpy(labels).reshape(-1)
                correct += int((pred == label_array).sum())
            total += int(first.shape[0])
            batches += 1
            if progress is not None:
                progress(batches)
        seconds = time.perf_counter() - start
        return DatasetResult(
            num_samples=total,
            num_batches=batches,
            top1=(100.0 * correct / total) if have_labels and total else None,
            seconds=seconds,
            outputs=np.concatenate(kept) if kept else None,
            predictions=np.concatenate(predictions) if predictions else None,
        )

    def measure_latency(self, inputs: Inputs, *, warmup: int = 3, iterations: int = 20, min_seconds: float = 0.0) -> LatencyStats:
        """Median latency of :meth:`run` on one batch (after ``warmup`` runs)."""
        feeds = self.feeds(inputs)
        for _ in range(warmup):
            self.run(feeds)
        samples: List[float] = []
        start = time.perf_counter()
        while len(samples) < iterations or (time.perf_counter() - start) < min_seconds:
            t0 = time.perf_counter()
            self.run(feeds)
            samples.append(time.perf_counter() - t0)
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        return LatencyStats.from_samples(samples, batch)


__all__ = ["DatasetResult", "Inputs", "LatencyStats", "Runner", "RunnerError", "to_numpy"]
