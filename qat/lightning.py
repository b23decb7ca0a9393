"""QAT inside a Lightning ``Trainer``: ``L.Trainer(callbacks=[qat.LightningCallback(scales=...)])``.

Importing this module needs ``lightning`` (``pip install 'quantlab[lightning]'``);
``quantlab.qat`` itself imports it only when ``qat.LightningCallback`` is used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Union

from quantlab.qat.errors import missing_dependency

try:
    import lightning.pytorch as _pl
except ImportError:  # pragma: no cover - exercised by the missing-dependency test
    raise missing_dependency("lightning", "lightning", "quantlab.qat.LightningCallback") from None

from torch import nn

from quantlab.qat.prepare import is_prepared, prepare, save
from quantlab.scales import Scales
from quantlab.sparsity.mask import reapply_masks


class LightningCallback(_pl.Callback):
    """Prepares the LightningModule (or one of its sub-modules) for QAT before the optimizers exist.

    ``setup`` runs before ``configure_optimizers``, so learned ranges are part
    of ``self.parameters()``; under a DDP strategy the process group already
    exists there, so calibration statistics are merged and ranges broadcast.
    A network pruned with :func:`quantlab.sparsity.prune` keeps its 2:4 pattern:
    the pruned weights are zeroed again after every training batch.

    Args:
        scales: Starting scales (path or Scales).
        data: Calibration batches, used when ``scales`` is None.
        submodule: Attribute path of the network inside the LightningModule
            (e.g. ``"model"``) whose layer names match the scales file; default:
            the LightningModule itself.
        save_dir: If set, rank 0 writes :func:`quantlab.qat.save` there when fitting ends.
        **prepare_options: Passed to :func:`quantlab.qat.prepare` (``learn_amax``,
            ``weight_ranges``, ``fold_bn``, ``freeze_bn_after``, ``calibrator``, ...).
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
        super().__init__()
        self.scales = scales
        self.data = data
        self.submodule = submodule
        self.save_dir = save_dir
        self.prepare_options = prepare_options

    def target(self, pl_module: nn.Module) -> nn.Module:
        return pl_module.get_submodule(self.submodule) if self.submodule else pl_module

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        network = self.target(pl_module)
        if not is_prepared(network):
            prepare(network, scales=self.scales, data=self.data, **self.prepare_options)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimizer step: a 2:4-pruned network (quantlab.sparsity) keeps its pattern.
        reapply_masks(self.target(pl_module))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.save_dir is not None and trainer.is_global_zero:
            save(self.target(pl_module), self.save_dir)
