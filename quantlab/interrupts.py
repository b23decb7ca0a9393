"""SIGTERM (and SIGHUP) as an interruption, so a stopped run records that it was stopped.

A service manager, ``timeout`` or a closed terminal stops a process with SIGTERM
or SIGHUP; Python's default is to die on the spot, leaving its run ``running``
in the store for ever. :func:`terminate_as_interrupt` makes them raise
:class:`Terminated` (a ``KeyboardInterrupt``) instead, which unwinds like
Ctrl-C: staged run folders are discarded, the run is recorded ``interrupted``
(what an exception means for a run's record is decided in one place:
:func:`quantlab.jobs.recorder.outcome`). SIGKILL cannot be caught: readers then
see the dead owner process (:mod:`quantlab.store.owner`).

Two users, one mechanism:

* the CLI wraps every command (``terminate_as_interrupt()``: the signals are
  quantlab's for the command's lifetime);
* the recorder wraps every recorded run (``terminate_as_interrupt(only_default=True)``:
  a program that calls a job from Python and installed its own handler keeps it).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM/SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


#: Seconds after which a signal that arrived inside a finalizer is delivered again.
REDELIVER_SECONDS = 0.05


def _in_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _raise(signum, frame):
    if _in_finalizer(frame):
        # Python prints and drops an exception raised inside __del__ ("Exception ignored in ..."):
        # the stop would be lost and a traceback shown. Deliver the signal again once it returned.
        timer = threading.Timer(REDELIVER_SECONDS, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    raise Terminated(signum)


def _signals():
    return [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]


@contextlib.contextmanager
def terminate_as_interrupt(*, only_default: bool = False) -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (main thread only; else a no-op).

    Args:
        only_default: Replace only handlers that are still the default (which would kill
            the process on the spot); a handler the program installed itself is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in _signals():
        if only_default and signal.getsignal(sig) is not signal.SIG_DFL:
            continue
        previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["Terminated", "terminate_as_interrupt"]
