"""The QAT job: :func:`quantlab.qat.run.run_qat`, recorded as a ``qat`` run, its run folder committed as a whole.

Under torchrun every rank trains; rank 0 alone holds the run folder's lock,
writes the folder and records the run. The folder is committed twice, each
time as a whole (:func:`quantlab.jobs.folders.commit_files`): before training
(starting ranges, ``run.json``: state ``training``, resumable) and at the end
(state ``done``). A finished run is never resumed. A resumed run (``resume``)
is a new record whose parent is the interrupted one (when the store still has
it): a finished record, ``interrupted`` included, is never rewritten.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Union

from torch import nn

from quantlab.config import QuantConfig
from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.folders import OPEN_HERE, commit_files, open_on_main_rank
from quantlab.jobs.recorder import Recorder
from quantlab.qat import ddp
from quantlab.qat.loop import TrainConfig, TrainProgress
from quantlab.qat.loop_graphs import eager_reason
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
    folder: Any = OPEN_HERE,
    inputs: Optional[Dict[str, Any]] = None,
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
        folder: The run folder on ``out_dir`` as :func:`quantlab.jobs.folders.open_on_main_rank`
            gave it to the caller (rank 0: the open folder; other ranks: None; the CLI takes it
            before loading the model). By default it is opened here, before anything is recorded;
            None on rank 0 writes straight into ``out_dir`` (no lock, no staging).
        inputs: ``{label: path}`` of the run's inputs (none may lie in the folder), when opened here.

    Raises:
        QATError: nothing to resume, a finished run, or a resumed run measured another metric
            (before anything is recorded); whatever the run raised, after recording it.
        OutputPathError / RunLockedError: ``out_dir`` cannot be written (before anything is recorded).
    """
    out = Path(out_dir)
    train_config = train_config or TrainConfig()
    metric = metric or DEFAULT_METRIC[train_config.task]
    describe = describe or {}
    main = ddp.is_main_process()
    recorder = Recorder(store if main else None)
    previous_id = read_resumable(out, metric).get("run_id") if resume else None  # refused before anything is recorded
    # cuda_graphs="on" where graphs cannot run is refused here too; the plan goes into the record's config
    # (the outcome, e.g. a capture that failed and left the run eager, into run.json's "cuda_graphs").
    why_eager = eager_reason(model, train_config.cuda_graphs)
    own_folder = folder is OPEN_HERE
    if own_folder:
        folder = open_on_main_rank(out, main=main, kind="qat", inputs=None if resume else inputs,
                                   purpose="quantlab qat" + (" --resume" if resume else ""))
    try:
        description = RunDescription(
            kind=RunKind.QAT, model=describe.get("model") or type(model).__name__, data=describe.get("data"),
            eval_data=describe.get("eval_data"), run_dir=str(out),
            parent_id=previous_id if recorder.knows(previous_id) else None,  # a copied folder or a deleted record: no parent
            config={"train": train_config.to_dict(), "learn_amax": learn_amax, "weight_ranges": weight_ranges,
                    "fold_bn": fold_bn, "calibrator": calibrator, "metric": metric, "resumed": bool(resume),
                    "sparsity": "2:4" if (prune is not None or masked_layers(model)) else None,
                    "cuda_graphs": {"requested": train_config.cuda_graphs, "planned": "eager" if why_eager else "graphs",
                                    "eager_reason": why_eager},
                    "quant_config": quant_config.to_dict() if quant_config else None},
        )
        with recorder.run(description, interrupted_hint="resume with --resume") as run:

            def report(p: TrainProgress) -> None:
                if progress is not None:
                    progress(p)
                if p.step % max(1, p.total_steps // PROGRESS_WRITES) == 0:
                    run.progress(p.step / p.total_steps)

            def write_files(write: Any, *, state: str, base: str) -> Dict[str, Path]:
                return commit_files(folder, write, run=run, state=state, base=base)

            outcome = train_and_measure(
                model, train_data, eval_data, out_dir=out, train_config=train_config, metric=metric, resume=resume,
                calibrator=calibrator, learn_amax=learn_amax, weight_ranges=weight_ranges, fold_bn=fold_bn,
                quant_config=quant_config, run_id=run.run_id if main else None, progress=report, prune=prune,
                write_files=write_files if main and folder is not None else None, **options,
            )
            if main:  # recorded once the folder is committed: the files it names are there
                run.results(outcome.rows())
                run.artifact("scales", outcome.files["scales"])
                run.artifact("checkpoint", outcome.files["weights"])
    finally:
        if own_folder and folder is not None:
            folder.close()
    return outcome


__all__ = ["run_qat"]
