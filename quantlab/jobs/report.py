"""The report job: a self-contained HTML (or Markdown) report of a compare run folder.

Reads the run folder (results, scales with their histograms, sensitivity and
mixed-precision summaries), renders it with :mod:`quantlab.evaluation.report`,
writes it atomically and records it as an artifact of the compare run (a report
has no record of its own).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

from quantlab._io import write_text_atomic
from quantlab.evaluation.report import render_html, render_markdown
from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.recorder import Recorder
from quantlab.jobs.folders import relative_inputs
from quantlab.jobs.runs import read_results, read_run_file
from quantlab.scales import Scales
from quantlab.validation import check_run_info, check_sensitivity

FORMATS = ("html", "md")


def collect(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """Everything the report shows, read from the run folder."""
    folder = Path(run_dir)
    results = read_results(folder)
    info = read_run_file(folder / "run.json", check_run_info) if (folder / "run.json").is_file() else {}
    scales: Dict[str, Scales] = {}
    for name, path in (results.get("scales") or {}).items():
        candidate = Path(path)
        candidate = candidate if candidate.is_file() else folder / candidate.name
        if candidate.is_file():
            scales[name] = Scales.load(candidate)
    sensitivity = {p.name.split(".")[1]: read_run_file(p, check_sensitivity) for p in sorted(folder.glob("sensitivity.*.json"))}
    mixed = {p.parent.name.split(".", 1)[1]: read_run_file(p) for p in sorted(folder.glob("autoprecision.*/mixed.json"))}
    return {"folder": folder, "info": info, "results": results, "scales": scales, "sensitivity": sensitivity, "mixed": mixed}


def write_report(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None, *, fmt: str = "html") -> Path:
    """Writes the report of a compare run folder and returns its path.

    Args:
        run_dir: The compare run folder.
        out: Report file (default ``<run_dir>/report.html`` or ``report.md``).
        fmt: ``"html"`` (one self-contained file, inline SVG) or ``"md"``
            (Markdown plus an ``<name>_files/`` folder of SVG charts).

    Raises:
        RunFolderError: the folder has no results.json.
        OutputPathError: ``out`` is a file of the run, a folder, or an existing non-report file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"report format must be html or md, got {fmt!r}")
    from quantlab.outputs import REPORT_FILE, check_output_file

    target = Path(out) if out is not None else Path(run_dir) / f"report.{fmt}"
    check_output_file(target, label="--out", inputs=relative_inputs(run_dir), replace=REPORT_FILE)  # before reading anything
    data = collect(run_dir)
    if fmt == "html":
        return write_text_atomic(target, render_html(data))
    image_dir = target.parent / f"{target.stem}_files"
    text, images = render_markdown(data, image_dir, image_dir.name)
    for path, content in images.items():
        write_text_atomic(path, content)
    return write_text_atomic(target, text)


def run_report(info: Dict[str, Any], store: Any, *, out: Optional[Union[str, Path]] = None, fmt: str = "html") -> Path:
    """Writes the report of the compare run ``info`` (its ``run.json``) and records it on that run.

    Args:
        info: :func:`quantlab.jobs.runs.load_run_info` of the run.
        store: The run store the run is in; None records nothing (also when the
            run was never recorded: no ``run_id``).
        out: Report file (default ``<run folder>/report.<fmt>``).
        fmt: ``"html"`` or ``"md"``.

    Returns:
        The report file.
    """
    if not info.get("run_id"):
        return write_report(info["run_dir"], out, fmt=fmt)
    description = RunDescription(
        kind=RunKind.REPORT, model=info.get("model") or "model", data=info.get("data"), eval_data=info.get("eval_data"),
        parent_id=info["run_id"], run_dir=info["run_dir"], config={"format": fmt, "out": str(out) if out is not None else None},
    )
    with Recorder(store).run(description) as run:
        path = write_report(info["run_dir"], out, fmt=fmt)
        run.artifact("report", path)
    return path


__all__ = ["FORMATS", "collect", "run_report", "write_report"]
