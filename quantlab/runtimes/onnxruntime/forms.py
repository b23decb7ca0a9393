"""Which integer form the ``--target ort-cpu`` model takes on this CPU: detect, probe, cache, choose.

ONNX Runtime's x86 integer kernels (MLAS) multiply UINT8 activations by INT8
weights with ``vpmaddubsw`` where the CPU has no VNNI: two u8 x s8 products are
added into a SATURATING 16-bit sum, so ``255 * 127 + 255 * 127 = 64770`` becomes
32767 and the layer's result is silently wrong (AVX2-only CPUs: AMD Zen 1-3, Intel
before Cascade Lake / Alder Lake). VNNI (``vpdpbusd``) sums into 32 bits and is
exact. Three forms compute the same integers where they are exact:

* ``u8s8``: UINT8 activations (zero point 128), INT8 weights; the fastest with VNNI;
* ``u8u8``: the same weights stored as UINT8 ``q + 128`` with zero point 128: MLAS
  widens both sides to 16 bits (``vpmaddwd``, 32-bit sums), exact on every x86 CPU;
* ``qdq-float``: no integer kernels: float weights holding ``q * s``, activations
  rounded by QuantizeLinear and dequantized by Cast/Sub/Mul (which ORT cannot fuse);
  the same numbers as the TensorRT form computed in float.

7-bit weights ("reduce_range") make u8s8 exact everywhere too (``255 * 64 * 2 <
32768``) but change what TensorRT's model computes, so they are used only when the
user asks (and recorded in the file).

Detect: :func:`read_cpu_info` (CPU model and flags; VNNI predicts an exact u8s8).
Verify: :func:`probe` runs a tiny worst-case model of every integer op the forms
use through ONNX Runtime and compares it with the exact int64 result
(:mod:`quantlab.runtimes.onnxruntime.probe`). :func:`cached_probe` keeps the outcome per
(CPU model + flags, onnxruntime version) in ``~/.cache/quantlab``; :func:`choose_form`
picks u8s8 where exact, else u8u8, else qdq-float.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from quantlab._io import default_cache_dir, write_text_atomic
from quantlab.errors import QuantlabError
from quantlab.runtimes.onnxruntime.probe import PROBED_OPS, WEIGHT_LIMIT, OpOutcome, probe_variant

logger = logging.getLogger(__name__)

FORMS = ("u8s8", "u8u8", "qdq-float")
CHOICES = ("auto",) + FORMS
#: Probe variants: name -> (activation x weight types, weight bits). u8u8 and s8s8 kernels
#: widen to 16 bits before multiplying, so 7-bit weights change nothing for them; s8s8 is
#: what explicit INT8-activation nodes of other tools' files run.
VARIANTS = {"u8s8": ("u8s8", 8), "u8s8-w7": ("u8s8", 7), "u8u8": ("u8u8", 8), "s8s8": ("s8s8", 8)}
#: Flags that select ONNX Runtime's x86 integer kernels (shown; the cache key hashes all flags).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

class OrtFormError(QuantlabError):
    """An ort-cpu INT8 form is unknown, or its integer kernels are not exact on this CPU."""


CACHE_NAME = "ort_int8_probe.json"
CACHE_FORMAT = "quantlab.ort_int8_probe"
CACHE_VERSION = 1
_CACHE_MAX_BYTES = 1 << 20
_CACHE_MAX_ENTRIES = 32


# -- detect ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """What the CPU says about itself.

    Attributes:
        model: The model string (``model name`` in /proc/cpuinfo).
        flags: The :data:`KERNEL_FLAGS` it has, sorted.
        flags_digest: SHA-256 (16 hex digits) of every flag: a VM that masks one re-probes.
        machine: ``platform.machine()`` (x86_64, aarch64, ...).
        flags_known: Whether a flags line was read at all.
    """

    model: str
    flags: Tuple[str, ...]
    flags_digest: str
    machine: str
    flags_known: bool

    @property
    def vnni(self) -> Optional[bool]:
        """Whether the flags promise 32-bit u8 x s8 dot products (None: flags unknown)."""
        if not self.flags_known:
            return None
        return any(f in self.flags for f in VNNI_FLAGS)

    def describe(self) -> str:
        if not self.flags_known:
            return f"{self.model} (CPU flags unknown)"
        shown = ", ".join(self.flags) if self.flags else "no AVX2"
        return f"{self.model} ({shown}{'' if self.vnni else '; no VNNI'})"


def read_cpu_info(text: Optional[str] = None, path: str = "/proc/cpuinfo") -> CpuInfo:
    """The CPU's model and flags from ``text`` (a /proc/cpuinfo dump) or the file at ``path``.

    Never raises: an unreadable file gives the platform's model string and unknown flags.
    """
    if text is None:
        try:
            with open(path, "r", encoding="utf-8", errors="replace") as handle:
                text = handle.read(1 << 20)
        except OSError:
            text = ""
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not model and key in ("model name", "cpu model", "hardware"):
            model = value.strip()
        elif flags is None and key in ("flags", "features"):
            flags = value.split()
    model = " ".join(model.split())[:200] or platform.processor() or platform.machine() or "unknown CPU"
    all_flags = sorted(set(flags or []))
    digest = hashlib.sha256(" ".join(all_flags).encode()).hexdigest()[:16]
    kernel = tuple(f for f in KERNEL_FLAGS if f in all_flags)
    return CpuInfo(model, kernel, digest, platform.machine() or "unknown", flags is not None)


# -- verify: the probe (quantlab.runtimes.onnxruntime.probe) -----------------------------------------

@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Which forms ONNX Runtime computes exactly on one CPU.

    Attributes:
        cpu: What the CPU says (detect).
        onnxruntime: The onnxruntime version probed.
        outcomes: ``{variant: {op: OpOutcome}}`` for every variant of :data:`VARIANTS`.
        probed_at: UTC time of the probe (ISO 8601).
        seconds: How long the probe took.
    """

    cpu: CpuInfo
    onnxruntime: str
    outcomes: Mapping[str, Mapping[str, OpOutcome]]
    probed_at: str = ""
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return cache_key(self.cpu, self.onnxruntime)

    def inexact_ops(self, form: str, weight_bits: int = 8) -> List[Tuple[str, OpOutcome]]:
        """``(op, outcome)`` of every op ``form`` computes wrongly here (empty: exact).

        ``form``: a form of :data:`FORMS` or ``"s8s8"``; qdq-float has no integer kernels.
        """
        if form == "qdq-float":
            return []
        variant = variant_of(form, weight_bits)
        return [(op, o) for op, o in self.outcomes[variant].items() if not o.exact]

    def exact(self, form: str, weight_bits: int = 8, ops: Optional[Sequence[str]] = None) -> bool:
        bad = {op for op, _ in self.inexact_ops(form, weight_bits)}
        return not (bad & set(ops)) if ops is not None else not bad

    def describe(self) -> str:
        """One line: each form and whether it is exact here."""
        parts = [f"{v} {'exact' if not self.inexact_ops(*VARIANTS[v]) else 'NOT exact'}" for v in VARIANTS]
        return f"{self.cpu.describe()}, onnxruntime {self.onnxruntime}: " + ", ".join(parts)

    def to_dict(self) -> dict:
        return {
            "cpu_model": self.cpu.model, "cpu_flags": list(self.cpu.flags), "flags_digest": self.cpu.flags_digest,
            "machine": self.cpu.machine, "flags_known": self.cpu.flags_known, "onnxruntime": self.onnxruntime,
            "probed_at": self.probed_at, "seconds": self.seconds,
            "outcomes": {v: {op: {"exact": o.exact, "max_abs_error": o.max_abs_error} for op, o in ops.items()}
                         for v, ops in self.outcomes.items()},
        }

    @classmethod
    def from_dict(cls, data: object) -> "ProbeResult":
        """Parses and validates one cache entry.

        Raises:
            ValueError: any field missing, of the wrong type or out of bounds.
        """
        if not isinstance(data, dict):
            raise ValueError("entry is not an object")

        def text(name: str, limit: int = 300) -> str:
            value = data.get(name)
            if not isinstance(value, str) or not value or len(value) > limit:
                raise ValueError(f"{name} must be a non-empty string")
            return value

        flags = data.get("cpu_flags")
        if not isinstance(flags, list) or not all(isinstance(f, str) and f in KERNEL_FLAGS for f in flags):
            raise ValueError("cpu_flags must be a list of known flags")
        known = data.get("flags_known")
        seconds = data.get("seconds")
        if not isinstance(known, bool):
            raise ValueError("flags_known must be true or false")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not np.isfinite(seconds) or not 0 <= seconds < 3600:
            raise ValueError("seconds must be a finite number of seconds")
        digest = text("flags_digest", 16)
        if len(digest) != 16 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("flags_digest must be 16 hex digits")
        cpu = CpuInfo(text("cpu_model"), tuple(f for f in KERNEL_FLAGS if f in flags), digest, text("machine", 64), known)
        probed_at = text("probed_at", 64)
        try:
            datetime.datetime.fromisoformat(probed_at)
        except ValueError:
            raise ValueError("probed_at must be an ISO 8601 time") from None
        raw = data.get("outcomes")
        if not isinstance(raw, dict) or set(raw) != set(VARIANTS):
            raise ValueError(f"outcomes must hold exactly the variants {sorted(VARIANTS)}")
        outcomes: Dict[str, Dict[str, OpOutcome]] = {}
        for variant, ops in raw.items():
            if not isinstance(ops, dict) or set(ops) != set(PROBED_OPS):
                raise ValueError(f"outcomes[{variant}] must hold exactly the ops {list(PROBED_OPS)}")
            outcomes[variant] = {}
            for op in PROBED_OPS:
                entry = ops[op]
                exact = entry.get("exact") if isinstance(entry, dict) else None
                error = entry.get("max_abs_error") if isinstance(entry, dict) else None
                if not isinstance(exact, bool) or isinstance(error, bool) or not isinstance(error, int) or not -1 <= error < 2**31:
                    raise ValueError(f"outcomes[{variant}][{op}] must be {{exact: bool, max_abs_error: int}}")
                if exact != (error == 0):
                    raise ValueError(f"outcomes[{variant}][{op}]: exact contradicts max_abs_error")
                outcomes[variant][op] = OpOutcome(exact, error)
        return cls(cpu, text("onnxruntime", 64), outcomes, probed_at, float(seconds))


def variant_of(form: str, weight_bits: int = 8) -> str:
    """The probe variant that decides ``form`` with ``weight_bits``-bit weights."""
    if form not in ("u8s8", "u8u8", "s8s8") or weight_bits not in WEIGHT_LIMIT:
        raise ValueError(f"no probe for form {form!r} with {weight_bits}-bit weights")
    if form == "u8s8":
        return "u8s8" if weight_bits == 8 else "u8s8-w7"
    return form


def probe(cpu: Optional[CpuInfo] = None) -> ProbeResult:
    """Runs every variant's probe through ONNX Runtime now (about 0.1-0.5 s)."""
    import onnxruntime as ort

    cpu = cpu or read_cpu_info()
    start = time.perf_counter()
    outcomes = {name: probe_variant(*spec) for name, spec in VARIANTS.items()}
    result = ProbeResult(cpu, ort.__version__, outcomes, datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         round(time.perf_counter() - start, 4))
    predicted, measured = cpu.vnni, result.exact("u8s8")
    if predicted is not None and predicted != measured:
        logger.warning("CPU flags of %s predict u8s8 %s, the probe found it %s: trusting the probe",
                       cpu.describe(), "exact" if predicted else "inexact", "exact" if measured else "inexact")
    return result


# -- the cache -------------------------------------------------------------------------------

def cache_key(cpu: CpuInfo, onnxruntime_version: str) -> str:
    return f"{cpu.machine}|{cpu.model}|{cpu.flags_digest}|onnxruntime {onnxruntime_version}"


def cache_file() -> Path:
    """The probe cache in quantlab's cache folder (``$QUANTLAB_CACHE``, else ``~/.cache/quantlab``)."""
    return default_cache_dir() / CACHE_NAME


def _read_entries(path: Path) -> Dict[str, dict]:
    """The cache file's raw entries ({} when missing, unreadable, too big or not our format)."""
    try:
        if path.stat().st_size > _CACHE_MAX_BYTES:
            raise ValueError("larger than 1 MiB")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
            raise ValueError(f"not a {CACHE_FORMAT} v{CACHE_VERSION} file")
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise ValueError("'entries' is not an object")
        return entries
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        logger.warning("ignoring the ONNX Runtime probe cache %s (%s); probing again", path, str(exc)[:200])
        return {}


def read_cache(path: Path, key: str) -> Optional[ProbeResult]:
    """The validated entry for ``key`` in the cache file at ``path`` (None: absent or bad)."""
    entry = _read_entries(path).get(key)
    if entry is None:
        return None
    try:
        result = ProbeResult.from_dict(entry)
        if result.key != key:
            raise ValueError("entry does not match its key")
        return result
    except ValueError as exc:
        logger.warning("ignoring the bad entry %r of %s (%s); probing again", key, path, exc)
        return None


def write_cache(path: Path, result: ProbeResult) -> bool:
    """Adds ``result`` to the cache file atomically (keeping the other valid entries).

    Returns False (after a warning) when the file cannot be written: the probe then
    simply runs again in the next process.
    """

    entries = {}
    for key, entry in _read_entries(path).items():
        try:
            if ProbeResult.from_dict(entry).key == key:
                entries[key] = entry
        except ValueError:
            continue
    entries.pop(result.key, None)
    entries = dict(list(entries.items())[-(_CACHE_MAX_ENTRIES - 1):])
    entries[result.key] = result.to_dict()
    try:
        write_text_atomic(path, json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": entries}, indent=1))
        return True
    except OSError as exc:
        logger.warning("cannot write the ONNX Runtime probe cache %s: %s", path, exc)
        return False


_MEMO: Dict[Tuple[str, str], ProbeResult] = {}


def cached_probe(*, refresh: bool = False, path: Optional[Path] = None) -> ProbeResult:
    """This CPU's probe result: from memory, else the cache file, else a new probe (then cached)."""
    import onnxruntime as ort

    path = Path(path) if path is not None else cache_file()
    cpu = read_cpu_info()
    key = cache_key(cpu, ort.__version__)
    memo_key = (str(path), key)
    if not refresh:
        if memo_key in _MEMO:
            return _MEMO[memo_key]
        result = read_cache(path, key)
        if result is not None:
            _MEMO[memo_key] = result
            return result
    result = probe(cpu)
    write_cache(path, result)
    _MEMO[memo_key] = result
    return result


# -- choose ----------------------------------------------------------------------------------

def choose_form(result: ProbeResult, weight_bits: int = 8) -> str:
    """u8s8 where the probe found it exact, else u8u8, else qdq-float (pure: no probe)."""
    for form in ("u8s8", "u8u8"):
        if result.exact(form, weight_bits):
            return form
    return "qdq-float"


@dataclasses.dataclass(frozen=True)
class FormChoice:
    """The ort-cpu form an export writes, and why.

    Attributes:
        form: ``"u8s8"``, ``"u8u8"`` or ``"qdq-float"``.
        requested: What the user asked (``"auto"`` or a form).
        weight_bits: 8, or 7 when the user asked for reduce_range.
        probe: The probe result behind it.
    """

    form: str
    requested: str
    weight_bits: int
    probe: ProbeResult

    @property
    def exact_here(self) -> bool:
        return self.probe.exact(self.form, self.weight_bits)

    def to_dict(self) -> dict:
        return {"form": self.form, "requested": self.requested, "weight_bits": self.weight_bits,
                "exact_here": self.exact_here, "chosen_on": chosen_on(self.probe)}


def chosen_on(result: ProbeResult) -> str:
    return f"{result.cpu.describe()}; onnxruntime {result.onnxruntime}"


def resolve_form(requested: str = "auto", *, reduce_range: bool = False, probe_result: Optional[ProbeResult] = None) -> FormChoice:
    """The form for ``requested`` on this CPU (``auto``: :func:`choose_form` on the probe).

    A forced form is honoured even where it is not exact here (the file may be for
    another machine); :attr:`FormChoice.exact_here` says so and ``quantlab run`` on
    such a CPU refuses it.

    Raises:
        OrtFormError: ``requested`` is not one of :data:`CHOICES`.
    """
    if requested not in CHOICES:
        raise OrtFormError(f"ort-cpu INT8 form must be one of {', '.join(CHOICES)}, got {requested!r}")
    weight_bits = 7 if reduce_range else 8
    result = probe_result if probe_result is not None else cached_probe()
    form = choose_form(result, weight_bits) if requested == "auto" else requested
    choice = FormChoice(form, requested, weight_bits, result)
    if not choice.exact_here:
        logger.warning("ort-cpu form %s is not exact on this CPU (%s); ONNX Runtime here will refuse to run it",
                       form, result.describe())
    return choice


__all__ = [
    "CHOICES", "FORMS", "PROBED_OPS", "VARIANTS", "CpuInfo", "FormChoice", "OpOutcome", "ProbeResult",
    "cache_file", "cache_key", "cached_probe", "choose_form", "chosen_on", "probe", "read_cache",
    "read_cpu_info", "resolve_form", "variant_of", "write_cache",
]
