"""The PyTorch backend of the runner interface (FP32 or fake-quantized models)."""
from __future__ import annotations

import inspect
from typing import List, Optional

import numpy as np
import torch
from torch import nn

from quantlab.batching import model_device
from quantlab.runtimes.base import Inputs, Runner, RunnerError, to_numpy


class TorchRunner(Runner):
    """Runs an ``nn.Module`` under ``torch.no_grad`` on the model's own device.

    Args:
        model: The model (put in eval mode).
        input_names: Names for positional inputs (default: the forward signature).
    """

    backend = "torch"

    def __init__(self, model: nn.Module, input_names: Optional[List[str]] = None) -> None:
        self.model = model.eval()
        self.device = model_device(model)
        if input_names is None:
            try:
                params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                input_names = [params[0].name] if params else ["input"]
            except (TypeError, ValueError):
                input_names = ["input"]
        self._input_names = list(input_names)

    @property
    def input_names(self) -> List[str]:
        return self._input_names

    @property
    def output_names(self) -> List[str]:
        return ["output"]

    def run(self, inputs: Inputs) -> List[np.ndarray]:
        feeds = self.feeds(inputs)
        args = [torch.as_tensor(feeds[name]).to(self.device) for name in self._input_names if name in feeds]
        if len(args) != len(feeds):
            raise RunnerError(f"inputs {sorted(feeds)} do not match {self._input_names}")
        with torch.no_grad():
            out = self.model(*args)
        flat, _ = torch.utils._pytree.tree_flatten(out)
        return [to_numpy(t) for t in flat if isinstance(t, torch.Tensor)]

    def feeds(self, inputs: Inputs) -> dict:
        if isinstance(inputs, torch.Tensor) or isinstance(inputs, np.ndarray):
            return {self._input_names[0]: inputs}
        return {k: v for k, v in super().feeds(inputs).items()}


__all__ = ["TorchRunner"]
