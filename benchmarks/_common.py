"""Shared helpers for the benchmark scripts: machine header, timing, memory, output.

Every script prints a markdown section to stdout; ``--append PATH`` also appends
that section (dated) to a results file. Scripts never write RESULTS.md on their
own: the lead decides what gets recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
CPU_NOISE_NOTE = (
    "CPU timings on the shared 2-core development machine are noisy (other engineers run tests on the "
    "same cores); re-run when the machine is quiet."
)
TENSORRT_NOTE = "TensorRT numbers cannot be taken here (TensorRT is not installable on these machines); none are estimated."


# -- machine and versions --------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    return "none"


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed
        return "not installed"


def machine_header(title: str, extra: Optional[Dict[str, Any]] = None) -> str:
    """Markdown heading plus a line of date, machine and versions."""
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = {
        "date": when,
        "CPU": f"{cpu_model()}, {os.cpu_count()} cores",
        "torch threads": torch.get_num_threads(),
        "GPU": gpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": package_version("onnxruntime"),
        "nvidia-modelopt": package_version("nvidia-modelopt"),
        "transformers": package_version("transformers"),
    }
    parts.update(extra or {})
    line = "; ".join(f"{k}: {v}" for k, v in parts.items())
    return f"## {title}\n\n{line}\n"


# -- timing -----------------------------------------------------------------------------------------------
def sync(device: "torch.device | str | None" = None) -> None:
    """Waits for queued device work so a host clock measures it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: "torch.device | str | None" = None) -> tuple:
    """Runs ``fn`` once; returns ``(seconds, result)`` with device sync around it."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median_time(
    fn: Callable[[], Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: "torch.device | str | None" = None,
) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = [timed(fn, device)[0] for _ in range(max(1, repeats))]
    return statistics.median(times)


# -- memory -----------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """Peak resident set of this process since it started (getrusage; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Samples this process's RSS in a thread (every ``interval`` s) and the CUDA peak.

    Use as a context manager; afterwards ``host_peak``/``host_start`` (bytes) and
    ``device_peak`` (bytes, ``torch.cuda.max_memory_allocated`` since entry, or
    None without CUDA) hold the measurements. Sampling misses spikes shorter than
    ``interval``; the process-wide getrusage peak is reported beside it.
    """

    def __init__(self, interval: float = 0.005, device: "torch.device | str | None" = None) -> None:
        self.interval = interval
        self.device = torch.device(device) if device is not None else None
        self.host_start = 0
        self.host_peak = 0
        self.device_peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.host_peak = max(self.host_peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.host_start = self.host_peak = _rss_bytes()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_peak = torch.cuda.max_memory_allocated(self.device)
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.host_peak = max(self.host_peak, _rss_bytes())

    @property
    def host_growth(self) -> int:
        return self.host_peak - self.host_start


def mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


# -- output -----------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v == 0:
                return "0"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 1:
                return f"{v:.2f}"
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--append", metavar="PATH", help="also append the dated section to this results file")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def setup_torch(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available on this machine")
    return device


def emit(section: str, append: Optional[str]) -> None:
    """Prints the section and, with ``append``, appends it to that file."""
    print(section, flush=True)
    if append:
        with open(append, "a", encoding="utf-8") as f:
            f.write("\n" + section.rstrip() + "\n")


# -- isolated workers (clean per-tool peak memory) --------------------------------------------------------
def run_worker(script: Path, worker_args: List[str], timeout: Optional[float] = None) -> Dict[str, Any]:
    """Runs ``script --worker ...`` in a fresh interpreter; returns the JSON it prints last.

    A fresh process per tool makes getrusage's peak RSS that tool's own and keeps
    one tool's caches and allocator state from helping or hurting the next.
    """
    cmd = [sys.executable, str(script), "--worker", *worker_args]
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"error": f"worker {' '.join(worker_args[:4])} ran past --timeout {timeout:g} s"}
    marker = "@@RESULT@@"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"error": f"worker {' '.join(worker_args)} exited {proc.returncode}: {tail.strip()}"}


def worker_result(result: Dict[str, Any]) -> None:
    print("@@RESULT@@" + json.dumps(result), flush=True)


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
