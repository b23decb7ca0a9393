"""Output fidelity against FP32, Polygraphy-style: how close a model's raw outputs stay to FP32's.

Accuracy counts decisions; these numbers compare the outputs themselves on the
same inputs (the main output tensor: logits, or the pooled embedding):

* ``max_abs_error``: max |y - y_fp32| over every element;
* ``max_rel_error``: max |y - y_fp32| / |y_fp32| over the elements where
  y_fp32 != 0 (Polygraphy divides by |y_fp32| too; zeros are left out here rather
  than reported as infinite);
* ``mean_cosine`` and ``one_minus_cosine``: cosine similarity of each sample's
  flattened output with FP32's, averaged; 1 - cos is the readable form (0.9999
  and 0.999 look alike, 1e-4 and 1e-3 do not);
* ``kl_divergence``: mean over rows (samples, or tokens of an LM) of
  KL(softmax(y_fp32) || softmax(y)) in nats, for logits only;
* ``top1_agreement``: percent of rows whose argmax equals FP32's.

:func:`compare_outputs` is the pure function on two tensors;
:class:`FidelityAccumulator` folds batch after batch (the same numbers as one
call on the concatenated outputs: maxima are maxima, means are weighted).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch

#: The fields of a fidelity row (besides precision / calibrator / source).
FIELDS = ("n", "top1_agreement", "max_abs_error", "max_rel_error", "mean_cosine", "one_minus_cosine", "kl_divergence")


@dataclasses.dataclass
class Fidelity:
    """Output comparison of one configuration against FP32 (see the module doc).

    Attributes:
        n: Samples compared.
        top1_agreement: Percent of rows with FP32's argmax (None unless logits).
        max_abs_error / max_rel_error: Largest element errors.
        mean_cosine / one_minus_cosine: Mean per-sample cosine to FP32, and 1 - it.
        kl_divergence: Mean KL(softmax FP32 || softmax this) in nats (None unless logits).
    """

    n: int
    top1_agreement: Optional[float]
    max_abs_error: float
    max_rel_error: float
    mean_cosine: float
    one_minus_cosine: float
    kl_divergence: Optional[float]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class FidelityAccumulator:
    """Folds (output, FP32 output) batch pairs into a :class:`Fidelity`.

    Args:
        logits: The outputs are logits over the last dimension (adds agreement and KL).
    """

    def __init__(self, *, logits: bool) -> None:
        self.logits = logits
        self.samples = 0
        self.rows = 0
        self.agree = 0
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.cos_sum = 0.0
        self.kl_sum = 0.0

    def update(self, output: torch.Tensor, reference: torch.Tensor) -> None:
        """Adds one batch (``output`` and FP32's ``reference`` of the same inputs, same shape)."""
        if output.shape != reference.shape:
            raise ValueError(f"output {list(output.shape)} and FP32 output {list(reference.shape)} differ in shape")
        y = output.detach().double().cpu()
        r = reference.detach().double().cpu()
        diff = (y - r).abs()
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.max()))
            nonzero = r != 0
            if bool(nonzero.any()):
                self.max_rel = max(self.max_rel, float((diff[nonzero] / r[nonzero].abs()).max()))
        flat_y, flat_r = y.reshape(y.shape[0], -1), r.reshape(r.shape[0], -1)
        self.cos_sum += float(torch.nn.functional.cosine_similarity(flat_y, flat_r, dim=1, eps=1e-30).sum())
        self.samples += int(y.shape[0])
        if self.logits:
            rows_y, rows_r = y.reshape(-1, y.shape[-1]), r.reshape(-1, r.shape[-1])
            self.agree += int((rows_y.argmax(dim=-1) == rows_r.argmax(dim=-1)).sum())
            log_p = torch.log_softmax(rows_r, dim=-1)
            log_q = torch.log_softmax(rows_y, dim=-1)
            self.kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
            self.rows += int(rows_y.shape[0])

    def result(self) -> Optional[Fidelity]:
        """The fidelity so far (None before any batch)."""
        if self.samples == 0:
            return None
        mean_cos = self.cos_sum / self.samples
        return Fidelity(
            n=self.samples,
            top1_agreement=100.0 * self.agree / self.rows if self.logits and self.rows else None,
            max_abs_error=self.max_abs,
            max_rel_error=self.max_rel,
            mean_cosine=mean_cos,
            one_minus_cosine=max(0.0, 1.0 - mean_cos),
            kl_divergence=self.kl_sum / self.rows if self.logits and self.rows else None,
        )


def compare_outputs(output: torch.Tensor, reference: torch.Tensor, *, logits: bool = True) -> Fidelity:
    """The :class:`Fidelity` of ``output`` against FP32's ``reference`` ([samples, ...], same shape)."""
    accumulator = FidelityAccumulator(logits=logits)
    accumulator.update(output, reference)
    result = accumulator.result()
    if result is None:
        raise ValueError("no samples to compare")
    return result


__all__ = ["FIELDS", "Fidelity", "FidelityAccumulator", "compare_outputs"]
