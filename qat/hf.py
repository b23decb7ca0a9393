"""QAT inside a Hugging Face ``Trainer``: ``Trainer(..., callbacks=[qat.HFTrainerCallback(scales=...)])``.

Importing this module needs ``transformers`` (``pip install 'quantlab[hf]'``);
``quantlab.qat`` itself imports it only when ``qat.HFTrainerCallback`` is used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Union

from quantlab.qat.errors import QATError, missing_dependency

try:
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # pragma: no cover - exercised by the missing-dependency test
    raise missing_dependency("transformers", "hf", "quantlab.qat.HFTrainerCallback") from None

from quantlab.qat.prepare import is_prepared, prepare, qat_options, save
from quantlab.scales import Scales
from quantlab.sparsity.mask import reapply_masks


class HFTrainerCallback(_TrainerCallback):
    """Prepares the Trainer's model for QAT when the Trainer is built (before its optimizer).

    Pass it to the ``Trainer`` constructor: ``on_init_end`` runs after the model
    is on its device and before ``train()`` creates the optimizer, so learned
    ranges are optimized too. (The Trainer decays every parameter except biases
    and norms: set ``weight_decay=0`` when learning ranges.) A network pruned with
    :func:`quantlab.sparsity.prune` keeps its 2:4 pattern: the pruned weights are
    zeroed again after every optimizer step.

    Args:
        scales: Starting scales (path or Scales).
        data: Calibration batches, used when ``scales`` is None.
        submodule: Attribute path of the network inside the Trainer's model whose
            layer names match the scales file (default: the whole model).
        save_dir: If set, the main process writes :func:`quantlab.qat.save` there when training ends.
        **prepare_options: Passed to :func:`quantlab.qat.prepare`.
    """

    def __init__(
        self,
        scales: Union[str, Path, Scales, None] = None,
        data: Optional[Iterable[Any]] = None,
        *,
        submodule: Optional[str] = None,
        save_dir: Union[str, Path, None] = None,
        **prepare_options: Any,
    ) -> None:
        self.scales = scales
        self.data = data
        self.submodule = submodule
        self.save_dir = save_dir
        self.prepare_options = prepare_options

    def target(self, model: Any) -> Any:
        if model is None:
            return None
        return model.get_submodule(self.submodule) if self.submodule else model

    def _prepare(self, model: Any) -> None:
        network = self.target(model)
        if network is not None and not is_prepared(network):
            prepare(network, scales=self.scales, data=self.data, **self.prepare_options)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._prepare(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        network = self.target(model)
        if network is not None and not is_prepared(network):
            # Added after construction (trainer.add_callback): the optimizer already exists.
            if self.prepare_options.get("learn_amax") or self.prepare_options.get("weight_ranges") == "learn":
                raise QATError(
                    "learned ranges need the callback at Trainer construction (Trainer(..., callbacks=[...])), "
                    "before the optimizer is created"
                )
            self._prepare(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # After the optimizer step: a 2:4-pruned network (quantlab.sparsity) keeps its pattern.
        network = self.target(model)
        if network is not None:
            reapply_masks(network)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        network = self.target(model)
        if self.save_dir is not None and state.is_world_process_zero and network is not None and qat_options(network):
            save(network, self.save_dir)
