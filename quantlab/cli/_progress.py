"""The terminal renderer of the jobs' progress: stage messages and a tqdm bar on stderr.

Library code and jobs never print; they call a progress callback
(:data:`quantlab.jobs.progress.Progress`: ``progress(stage, done, total)``).
The CLI passes the renderers of this module. They draw only where a person
watches: stderr is a terminal and ``--quiet`` was not given
(:func:`configure`, called once by :func:`quantlab.cli.main.main`). Otherwise
they draw nothing, so a log or a pipe gets only the results on stdout (and
errors on stderr).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

_state = {"quiet": False, "command": "quantlab"}


def configure(*, quiet: bool = False, command: Optional[str] = None) -> None:
    """Set once per CLI call: ``--quiet`` and the command's name (the prefix of stage messages)."""
    _state["quiet"] = bool(quiet)
    _state["command"] = f"quantlab {command}" if command else "quantlab"


def shown(main_rank: bool = True) -> bool:
    """Whether progress is drawn: not ``--quiet``, stderr a terminal, and (under torchrun) rank 0."""
    if _state["quiet"] or not main_rank:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def stage(text: str, *, main_rank: bool = True) -> None:
    """One stage message line on stderr (``quantlab compare: evaluating FP32``), where progress is shown."""
    if not shown(main_rank):
        return
    from tqdm import tqdm

    tqdm.write(f"{_state['command']}: {text}", file=sys.stderr)  # above any bar being drawn


def bar(total: Optional[int], desc: str, *, unit: str = "batch", main_rank: bool = True, **kwargs: Any):
    """A tqdm bar on stderr, disabled where progress is not shown."""
    from tqdm import tqdm

    return tqdm(total=total or None, desc=desc, unit=unit, file=sys.stderr, disable=not shown(main_rank),
                leave=False, dynamic_ncols=True, **kwargs)


@contextmanager
def progress_bar(total: Optional[int], desc: str, shown_here: bool = True, unit: str = "batch") -> Iterator:
    """A stage message and a bar; yields ``update(n_done)`` (``run_ptq``'s and ``run_model``'s callback)."""
    stage(desc, main_rank=shown_here)
    drawn = bar(total, desc, unit=unit, main_rank=shown_here)
    state = {"n": 0}

    def update(done: int) -> None:
        drawn.update(done - state["n"])
        state["n"] = done

    try:
        yield update
    finally:
        drawn.close()


class StageProgress:
    """``progress(stage, done, total)`` -> a stage message per new stage and a bar per stage (total 0: no bar)."""

    def __init__(self, unit: str = "step", *, main_rank: bool = True) -> None:
        self.unit, self.main_rank = unit, main_rank
        self.stage: Optional[str] = None
        self.bar = None
        self.done = 0
        self.started = time.monotonic()

    def __call__(self, stage_text: str, done: int = 0, total: int = 0) -> None:
        if stage_text != self.stage:
            self.close()
            self.stage, self.done = stage_text, 0
            stage(stage_text, main_rank=self.main_rank)
            if total:
                self.bar = bar(total, stage_text[:40], unit=self.unit, main_rank=self.main_rank)
        if self.bar is not None:
            self.bar.update(max(0, done - self.done))
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FractionProgress:
    """``progress(stage, fraction)`` (the demo job's) -> a stage message per new stage and one 0-100 % bar."""

    def __init__(self, desc: str = "demo") -> None:
        self.bar = bar(100, desc, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
        self.done = 0
        self.stage: Optional[str] = None

    def __call__(self, stage_text: str, fraction: float) -> None:
        if stage_text != self.stage:
            self.stage = stage_text
            stage(stage_text)
            self.bar.set_description_str(stage_text[:48])
        target = int(min(1.0, max(0.0, fraction)) * 100)
        if target > self.done:
            self.bar.update(target - self.done)
            self.done = target

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "FractionProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["FractionProgress", "StageProgress", "bar", "configure", "progress_bar", "shown", "stage"]
