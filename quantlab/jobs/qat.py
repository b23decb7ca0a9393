"""The QAT job: :func:`quantlab.qat.run.run_qat`, recorded as a ``qat`` run.

Under torchrun every rank trains and rank 0 records. A resumed run (``resume``)
continues the record of the interrupted one when the store still has it
(``run.json`` in the run folder names it), else it is recorded anew.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Union

from torch import nn

from quantlab.config import QuantConfig
from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.recorder import Recorder
from quantlab.qat import ddp
from quantlab.qat.loop import TrainConfig, TrainProgress
from quantlab.qat.run import DEFAULT_METRIC, QATRunResult, read_resumable
from quantlab.qat.run import run_qat as train_and_measure
from quantlab.sparsity.mask import masked_layers

# Progress is recorded about this many times over a run (a step can take milliseconds).
PROGRESS_WRITES = 50


def run_qat(
    model: nn.Module,
    train_data: Any,
    eval_data: Iterable[Any],
    *,
    out_dir: Union[str, Path],
    store: Any = None,
    describe: Optional[Dict[str, Optional[str]]] = None,
    progress: Optional[Callable[[TrainProgress], None]] = None,
    train_config: Optional[TrainConfig] = None,
    metric: Optional[str] = None,
    resume: bool = False,
    calibrator: str = "entropy",
    learn_amax: bool = False,
    weight_ranges: str = "recompute",
    fold_bn: bool = False,
    quant_config: Optional[QuantConfig] = None,
    prune: Optional[Callable[[nn.Module], Any]] = None,
    **options: Any,
) -> QATRunResult:
    """Runs QAT (see :func:`quantlab.qat.run.run_qat` for the other ``options``) and records it.

    Args:
        store: A :class:`quantlab.store.RunStore` to record the run in (rank 0), or None.
        describe: ``model``, ``data``, ``eval_data`` strings for the record.
        progress: ``progress(TrainProgress)`` after each step.
        prune: ``prune(model)`` makes the model 2:4-sparse after the dense FP32 reference is
            measured (sparse QAT: the INT8 rows are recorded as ``sparse`` / ``sparse-qat``,
            the run's config says ``"sparsity": "2:4"``; see :func:`quantlab.qat.run.run_qat`).

    Raises:
        QATError: nothing to resume, or a resumed run measured another metric
            (before anything is recorded); whatever the run raised, after recording it.
    """
    out = Path(out_dir)
    train_config = train_config or TrainConfig()
    metric = metric or DEFAULT_METRIC[train_config.task]
    describe = describe or {}
    main = ddp.is_main_process()
    recorder = Recorder(store if main else None)
    previous_id = read_resumable(out, metric).get("run_id") if resume else None  # refused before anything is recorded
    description = RunDescription(
        kind=RunKind.QAT, model=describe.get("model") or type(model).__name__, data=describe.get("data"),
        eval_data=describe.get("eval_data"), run_dir=str(out),
        config={"train": train_config.to_dict(), "learn_amax": learn_amax, "weight_ranges": weight_ranges,
                "fold_bn": fold_bn, "calibrator": calibrator, "metric": metric,
                "sparsity": "2:4" if (prune is not None or masked_layers(model)) else None,
                "quant_config": quant_config.to_dict() if quant_config else None},
    )
    adopt = previous_id if recorder.knows(previous_id) else None  # a resumed run whose record is gone: record it anew
    with recorder.run(description, run_id=adopt, interrupted_hint="resume with --resume") as run:

        def report(p: TrainProgress) -> None:
            if progress is not None:
                progress(p)
            if p.step % max(1, p.total_steps // PROGRESS_WRITES) == 0:
                run.progress(p.step / p.total_steps)

        outcome = train_and_measure(
            model, train_data, eval_data, out_dir=out, train_config=train_config, metric=metric, resume=resume,
            calibrator=calibrator, learn_amax=learn_amax, weight_ranges=weight_ranges, fold_bn=fold_bn,
            quant_config=quant_config, run_id=run.run_id if main else None, progress=report, prune=prune, **options,
        )
        if main:
            run.results(outcome.rows())
            run.artifact("scales", outcome.files["scales"])
            run.artifact("checkpoint", outcome.files["weights"])
    return outcome


__all__ = ["run_qat"]
