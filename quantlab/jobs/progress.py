"""The progress interface of the jobs: ``progress(stage, done, total)``.

Jobs never print. A long job calls ``progress(stage, done, total)``: ``stage``
names what runs now (``"int8 entropy"``, ``"exporting INT8 Q/DQ ONNX"``),
``done`` of ``total`` steps are finished (``total`` 0: a stage without steps,
announced once). The same callable shape is taken by
:func:`quantlab.evaluation.compare.compare`, :func:`quantlab.evaluation.sensitivity.rank_layers`
and the jobs over them; the CLI passes a terminal renderer
(``quantlab.cli._progress.StageProgress``), the dashboard's worker writes the
store (:class:`quantlab.jobs.demo.Reporter`).
"""
from __future__ import annotations

from typing import Callable

#: ``progress(stage, done, total)``.
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int = 0, total: int = 0) -> None:
    """The default: hears nothing."""


__all__ = ["Progress", "no_progress"]
