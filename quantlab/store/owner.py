"""Which process owns a run, and whether it is still alive.

A run is recorded with its owner: pid, host and the process's start time
(``<boot id>/<start tick>`` on Linux, from ``/proc``), so a pid the kernel has
since given to another process is not mistaken for the owner. A reader on the
same host can then tell that a ``running`` run's owner is gone (killed, power
loss) and show the run as ``interrupted``; on another host it cannot tell, and
says so (``None``).
"""
from __future__ import annotations

import dataclasses
import os
import socket
from functools import lru_cache
from typing import Any, Dict, Optional


@lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """An identifier of the process ``pid``'s start (empty where the OS does not tell)."""
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return ""
    # Field 22 (starttime, clock ticks after boot); the command name (field 2) may hold spaces,
    # so count from the last ")".
    fields = stat[stat.rfind(")") + 2:].split()
    if len(fields) < 20:
        return ""
    return f"{_boot_id()}/{fields[19]}"


def host_name() -> str:
    return socket.gethostname()


@dataclasses.dataclass(frozen=True)
class ProcessOwner:
    """The process that writes a run.

    Attributes:
        pid: Process id.
        host: Host name.
        start: :func:`process_start` of the pid when it was recorded ("" if unknown).
    """

    pid: int
    host: str
    start: str = ""

    @classmethod
    def current(cls) -> "ProcessOwner":
        pid = os.getpid()
        return cls(pid=pid, host=host_name(), start=process_start(pid))

    def alive(self) -> Optional[bool]:
        """True or False on this host; None when it cannot be told (another host)."""
        if self.host != host_name():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by someone else
        except (OSError, OverflowError, ValueError):
            return None
        if self.start:
            now = process_start(self.pid)
            if now and now != self.start:
                return False  # the pid was reused by a later process
            if not now and os.path.isdir("/proc"):
                return False  # /proc knows every live process: this one ended just now
        return _not_zombie(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Optional["ProcessOwner"]:
        """The owner recorded in ``data`` (None when missing or malformed)."""
        if not isinstance(data, dict):
            return None
        pid, host, start = data.get("pid"), data.get("host"), data.get("start", "")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0 or not isinstance(host, str) or not isinstance(start, str):
            return None
        return cls(pid=pid, host=host, start=start)


def _not_zombie(pid: int) -> bool:
    """A killed child whose parent has not reaped it yet still has a pid: it is dead all the same."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return True
    state = stat[stat.rfind(")") + 2:stat.rfind(")") + 3]
    return state not in ("Z", "X")


__all__ = ["ProcessOwner", "host_name", "process_start"]
