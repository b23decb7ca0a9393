"""Host-clock and GPU-event marks through one run_ptq-style pipeline call (the calibrators enqueued
behind the pass): where the host waits and what is left after the read-back, per call.

    with PipelineMarks(device) as marks:
        marks.start()
        run_pipeline(model, marks.loop(forward_loop(...)), calibrators)
        phases = marks.finish()   # {phase: ms}
"""
from __future__ import annotations

import importlib
import time
from typing import Any, Callable, Dict

import torch

# The order the phases are reported in (host clock, then GPU events from the call's start).
PHASES = (
    "host: setup until the first batch",
    "host: batches enqueued",
    "host: pass end, weights' ranges, until choose",
    "host: calibrators enqueued (block forms)",
    "host: waiting for the read-back",
    "host: after the read-back (statistics, settle, apply, scales)",
    "host: total",
    "GPU: pass done at",
    "GPU: calibrators done at",
)


class PipelineMarks:
    """Patches the pipeline's deferred choice and statistics read for the duration of a ``with`` block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: Dict[str, float] = {}
        self.events: Dict[str, Any] = {}

    def _event(self, name: str) -> None:
        if self.device.type == "cuda":
            self.events[name] = torch.cuda.Event(enable_timing=True)
            self.events[name].record()

    def __enter__(self) -> "PipelineMarks":
        from quantlab.calibrators import BlockChoices
        from quantlab.pipeline.types import Statistics

        self._choose = importlib.import_module("quantlab.pipeline.choose")  # the package exports a function of that name
        self._saved = BlockChoices, Statistics.complete
        recorder = self

        class Marked(BlockChoices):
            def __init__(self, *args, **kwargs):
                recorder.marks["choose"] = time.perf_counter()
                super().__init__(*args, **kwargs)
                recorder.marks["enqueued"] = time.perf_counter()
                recorder._event("calibrators")

        complete = Statistics.complete

        def marked_complete(statistics, scalars):
            recorder.marks.setdefault("read", time.perf_counter())
            return complete(statistics, scalars)

        self._choose.BlockChoices, Statistics.complete = Marked, marked_complete
        return self

    def __exit__(self, *exc: Any) -> None:
        from quantlab.pipeline.types import Statistics

        self._choose.BlockChoices, Statistics.complete = self._saved

    def start(self) -> None:
        """Call right before the pipeline call (after any sync)."""
        self.marks.clear()
        self.events.clear()
        self._event("start")
        self.marks["start"] = time.perf_counter()

    def loop(self, forward_loop: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``forward_loop`` with marks at its start and end (and its expected batch count kept)."""
        def marked(model: Any) -> Any:
            self.marks["loop"] = time.perf_counter()
            result = forward_loop(model)
            self.marks["batches"] = time.perf_counter()
            self._event("pass")
            return result

        marked.expected_batches = getattr(forward_loop, "expected_batches", None)
        return marked

    def finish(self) -> Dict[str, float]:
        """Call right after the pipeline call returns: the phases in ms (GPU ones after a sync)."""
        m = self.marks
        m["end"] = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # A mark the call never reached (no deferred choice, e.g. on the CPU) counts as the one before it.
        order = ("start", "loop", "batches", "choose", "enqueued", "read", "end")
        for before, name in zip(order, order[1:]):
            m.setdefault(name, m[before])
        host = {
            PHASES[0]: m["loop"] - m["start"],
            PHASES[1]: m["batches"] - m["loop"],
            PHASES[2]: m["choose"] - m["batches"],
            PHASES[3]: m["enqueued"] - m["choose"],
            PHASES[4]: m["read"] - m["enqueued"],
            PHASES[5]: m["end"] - m["read"],
            PHASES[6]: m["end"] - m["start"],
        }
        out = {name: seconds * 1000 for name, seconds in host.items()}
        if "pass" in self.events and "calibrators" in self.events:
            out[PHASES[7]] = self.events["start"].elapsed_time(self.events["pass"])
            out[PHASES[8]] = self.events["start"].elapsed_time(self.events["calibrators"])
        return out
