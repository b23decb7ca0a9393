"""SIGTERM (and SIGHUP) as an interruption, so a stopped run records that it was stopped.

A service manager, ``timeout`` or a closed terminal stops a process with SIGTERM
or SIGHUP; Python's default is to die on the spot, leaving its run ``running``
in the store for ever. :func:`terminate_as_interrupt` makes them raise
:class:`Terminated` (a ``KeyboardInterrupt``) instead, which unwinds like
Ctrl-C: staged run folders are discarded, the run is recorded ``interrupted``.
SIGKILL cannot be caught: readers then see the dead owner process
(:mod:`quantlab.store.owner`).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM/SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _raise(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def outcome_status(exc: BaseException) -> str:
    """The run status an exception means: ``interrupted`` for Ctrl-C/SIGTERM, else ``failed``."""
    return "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"


def outcome_message(exc: BaseException) -> str:
    """The error text recorded with the run."""
    if isinstance(exc, Terminated):
        return f"interrupted ({exc.args[0]})"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    from quantlab.errors import QuantlabError

    return str(exc) if isinstance(exc, QuantlabError) else f"{type(exc).__name__}: {exc}"


__all__ = ["Terminated", "outcome_message", "outcome_status", "terminate_as_interrupt"]
