"""Jobs: the workbench's units of work, each recorded in the run store through one recorder.

A job takes its inputs, calls the measuring and exporting layers below
(:mod:`quantlab.evaluation`, :mod:`quantlab.export`, :mod:`quantlab.runtimes`,
:mod:`quantlab.qat`), writes its run folder and records the run: a
:class:`RunDescription` (what runs) and a :class:`Recorder` (the only writer of
the store). The CLI and the dashboard are thin faces over these modules:

    compare        run_compare        FP32/FP16/INT8 per calibrator, run folder
    sensitivity    run_sensitivity    per-layer ranking of a recorded compare run
    autoprecision  run_autoprecision  mixed INT8/FP16 to meet a maximum drop (and by hand)
    export         run_export, export_artifacts, build_engine
    run            run_model          an ONNX file (or TensorRT plan) over a dataset
    qat            run_qat            QAT fine-tuning, recorded
    report         run_report         the HTML / Markdown report of a run folder
    demo           run_demo           compare -> sensitivity -> export (demo_spec: its JobSpec)
    worker         start_job          the demo job in a background process (the dashboard's)
    runs                              reading and rebuilding recorded runs
    folders        open_run_folder    run folders: checked and locked before the work, committed as a whole

Modules import their heavy dependencies inside functions where they can, so
importing a job is cheap.
"""
from quantlab.jobs.description import DESCRIPTION_VERSION, RunDescription, RunKind
from quantlab.jobs.errors import JobError, JobInputError, RecorderError, RunDescriptionError
from quantlab.jobs.recorder import RecordedRun, Recorder

__all__ = [
    "DESCRIPTION_VERSION", "JobError", "JobInputError", "RecordedRun", "Recorder", "RecorderError", "RunDescription",
    "RunDescriptionError", "RunKind",
]
