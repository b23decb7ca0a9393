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
* ``qdq-float``: weights dequantized, activations keep their Q/DQ rounding, float
  kernels (exact up to float accumulation order, like the TensorRT form in ORT).

7-bit weights ("reduce_range") make u8s8 exact everywhere too (``255 * 64 * 2 <
32768``) but change what TensorRT's model computes, so they are used only when the
user asks (and recorded in the file).

Detect: :func:`read_cpu_info` (CPU model and flags; VNNI predicts an exact u8s8).
Verify: :func:`probe` runs a tiny worst-case model of every integer op the forms
use (:data:`PROBED_OPS`) through ONNX Runtime and compares it with the exact int64
result. :func:`cached_probe` keeps the outcome per (CPU model + flags, onnxruntime
version) in ``~/.cache/quantlab``; :func:`choose_form` picks u8s8 where exact, else
u8u8, else qdq-float.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from quantlab.export.errors import OrtFormError

logger = logging.getLogger(__name__)

FORMS = ("u8s8", "u8u8", "qdq-float")
CHOICES = ("auto",) + FORMS
#: Integer ops the ort-cpu forms run (QLinearConv: fused by ORT from DQ -> Conv -> Q).
PROBED_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat")
#: Probe variants: name -> (activation x weight types, weight bits). u8u8 and s8s8 kernels
#: widen to 16 bits before multiplying, so 7-bit weights change nothing for them; s8s8 is
#: what explicit INT8-activation nodes of other tools' files run.
VARIANTS = {"u8s8": ("u8s8", 8), "u8s8-w7": ("u8s8", 7), "u8u8": ("u8u8", 8), "s8s8": ("s8s8", 8)}
WEIGHT_LIMIT = {8: 127, 7: 63}
#: Flags that select ONNX Runtime's x86 integer kernels (shown; the cache key hashes all flags).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

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


# -- verify: the probe -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OpOutcome:
    """One op's probe: exact, or off by ``max_abs_error`` (int32 units; output steps for
    QLinearConv; -1 when ONNX Runtime could not run it)."""

    exact: bool
    max_abs_error: int


# Along the reduction axis: zero sum, and (+L, +L) pairs at even AND odd offsets, so a
# kernel that adds neighbouring u8 x s8 products in 16 bits saturates whichever way it
# pairs them, while every exact sum stays small (outputs far from their clipping range).
_PERIOD = np.array([1, 1, 1, 1, -1, 0, -1, 0, -1, 0, -1, 0], dtype=np.int64)
_GEMM_K, _GEMM_N, _CONV_C, _CONV_HW = 96, 24, 24, 5
#: QLinearConv output scale: a power of two, so requantization is exact in float32.
QLINEAR_OUTPUT_SCALE = 4096.0
_MAX_ERROR = 2**31 - 1


def _pattern(length: int, limit: int, sign: int, shift: int) -> np.ndarray:
    return np.roll(np.resize(_PERIOD, length), shift) * sign * limit


def _extremes(rng: np.random.Generator, shape, low: int, high: int, p_high: float, p_low: float) -> np.ndarray:
    """Values mostly at the ends of [low, high] (where products are largest), some in between."""
    pick = rng.random(shape)
    values = rng.integers(low, high + 1, size=shape)
    values = np.where(pick < p_high, high, values)
    return np.where((pick >= p_high) & (pick < p_high + p_low), low, values).astype(np.int64)


def probe_inputs(weight_bits: int = 8, seed: int = 0) -> Dict[str, np.ndarray]:
    """The probe's integer data (int64): worst-case u8 activations and signed weights.

    Keys: ``gemm_a`` [8, K] and ``gemm_a1`` [1, K] (u8), ``gemm_b`` [K, N];
    ``conv_x`` [2, C, 5, 5] (u8), ``conv_w`` [C, C, 3, 3], ``conv1x1_w`` [C, C, 1, 1],
    ``depthwise_w`` [C, 1, 3, 3]. Weights lie in [-L, L], L = 127 (63 for 7 bits).
    """
    limit = WEIGHT_LIMIT[weight_bits]
    rng = np.random.default_rng(seed)
    gemm_a = _extremes(rng, (8, _GEMM_K), 0, 255, 0.5, 0.1)
    gemm_a[0], gemm_a[1], gemm_a[2] = 255, 0, np.resize([255, 0], _GEMM_K)
    gemm_b = _extremes(rng, (_GEMM_K, _GEMM_N), -limit, limit, 0.3, 0.3)
    for n in range(6):
        gemm_b[:, n] = _pattern(_GEMM_K, limit, 1, n)
        gemm_b[:, 6 + n] = _pattern(_GEMM_K, limit, -1, n)
    conv_x = _extremes(rng, (2, _CONV_C, _CONV_HW, _CONV_HW), 0, 255, 0.5, 0.1)
    conv_x[0] = 255
    weights = {}
    for name, taps in (("conv_w", 3), ("conv1x1_w", 1)):
        w = _extremes(rng, (_CONV_C, _CONV_C, taps, taps), -limit, limit, 0.3, 0.3)
        for o in range(16):  # the pattern along the input channels, the same at every tap
            w[o] = _pattern(_CONV_C, limit, 1 if o < 8 else -1, o % 8).reshape(-1, 1, 1)
        weights[name] = w
    depthwise = _extremes(rng, (_CONV_C, 1, 3, 3), -limit, limit, 0.3, 0.3)
    for c in range(16):  # the pattern along the taps of one channel
        depthwise[c, 0] = _pattern(9, limit, 1 if c < 8 else -1, c % 3).reshape(3, 3)
    return {"gemm_a": gemm_a, "gemm_a1": gemm_a[:1].copy(), "gemm_b": gemm_b, "conv_x": conv_x, **weights,
            "depthwise_w": depthwise}


def _conv_reference(x_u8: np.ndarray, w: np.ndarray, pad: int, groups: int) -> np.ndarray:
    """Exact int64 ``conv(x - 128, w)`` (stride 1; padding holds the zero point)."""
    x = np.pad(x_u8 - 128, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # N, C, H, W, kh, kw
    if groups == 1:
        return np.einsum("nchwij,ocij->nohw", windows, w)
    return np.einsum("nchwij,cij->nchw", windows, w[:, 0])


def probe_references(data: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The exact results of every probe output (int64; QLinearConv as its u8 output)."""
    acc_a = (data["gemm_a"] - 128) @ data["gemm_b"]
    acc_a1 = (data["gemm_a1"] - 128) @ data["gemm_b"]

    def requantized(acc: np.ndarray) -> np.ndarray:  # acc / 4096 is exact in float64; rint is half-even as MLAS
        return np.clip(np.rint(acc / QLINEAR_OUTPUT_SCALE) + 128, 0, 255).astype(np.int64)

    conv = _conv_reference(data["conv_x"], data["conv_w"], 1, 1)
    return {
        "MatMulInteger/8": acc_a, "MatMulInteger/1": acc_a1,
        "MatMulIntegerToFloat/8": acc_a, "MatMulIntegerToFloat/1": acc_a1,
        "ConvInteger/3x3": conv,
        "QLinearConv/3x3": requantized(conv),
        "QLinearConv/1x1": requantized(_conv_reference(data["conv_x"], data["conv1x1_w"], 0, 1)),
        "QLinearConv/depthwise": requantized(_conv_reference(data["conv_x"], data["depthwise_w"], 1, _CONV_C)),
    }


def build_probe_model(form: str, weight_bits: int = 8, data: Optional[Mapping[str, np.ndarray]] = None):
    """The probe as one ONNX model: every op of :data:`PROBED_OPS` with ``form``'s types,
    weights as initializers (so ONNX Runtime prepacks them as in a real model), one
    output each. Returns the model and its feeds."""
    from onnx import TensorProto, helper, numpy_helper

    data = dict(data) if data is not None else probe_inputs(weight_bits)
    unsigned = form == "u8u8"
    signed_activations = form == "s8s8"  # x - 128: the same values with zero point 0
    a_type = np.int8 if signed_activations else np.uint8
    a_elem = TensorProto.INT8 if signed_activations else TensorProto.UINT8
    w_type = np.uint8 if unsigned else np.int8

    def weight(values: np.ndarray) -> np.ndarray:
        return (values + 128).astype(np.uint8) if unsigned else values.astype(np.int8)

    w_zero = np.array(128 if unsigned else 0, dtype=w_type)
    inits = {
        "gemm_b": weight(data["gemm_b"]), "conv_w": weight(data["conv_w"]), "conv1x1_w": weight(data["conv1x1_w"]),
        "depthwise_w": weight(data["depthwise_w"]), "w_zero": w_zero,
        "w_zero_channels": np.full(_CONV_C, w_zero, dtype=w_type),
        "x_zero": np.array(0 if signed_activations else 128, dtype=a_type), "one": np.array(1.0, dtype=np.float32),
        "ones_channels": np.ones(_CONV_C, dtype=np.float32),
        "y_scale": np.array(QLINEAR_OUTPUT_SCALE, dtype=np.float32),
        "y_zero": np.array(0 if signed_activations else 128, dtype=a_type),
    }
    nodes, outputs = [], []

    def add(op: str, inputs: List[str], out: str, elem: int, domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        outputs.append(helper.make_tensor_value_info(out, elem, None))

    for a in ("gemm_a", "gemm_a1"):
        rows = a[len("gemm_a"):] or "8"
        add("MatMulInteger", [a, "gemm_b", "x_zero", "w_zero"], f"MatMulInteger/{rows}", TensorProto.INT32)
        add("MatMulIntegerToFloat", [a, "gemm_b", "one", "one", "x_zero", "w_zero"], f"MatMulIntegerToFloat/{rows}",
            TensorProto.FLOAT, domain="com.microsoft")
    add("ConvInteger", ["conv_x", "conv_w", "x_zero", "w_zero"], "ConvInteger/3x3", TensorProto.INT32, pads=[1, 1, 1, 1])
    for name, w, pad, group in (("3x3", "conv_w", 1, 1), ("1x1", "conv1x1_w", 0, 1), ("depthwise", "depthwise_w", 1, _CONV_C)):
        add("QLinearConv", ["conv_x", "one", "x_zero", w, "ones_channels", "w_zero_channels", "y_scale", "y_zero"],
            f"QLinearConv/{name}", a_elem, pads=[pad] * 4, group=group)
    inputs = [helper.make_tensor_value_info(name, a_elem, list(data[name].shape)) for name in ("gemm_a", "gemm_a1", "conv_x")]
    graph = helper.make_graph(nodes, f"quantlab_ort_int8_probe_{form}_w{weight_bits}", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = min(model.ir_version, 9)
    shift = 128 if signed_activations else 0
    return model, {name: (data[name] - shift).astype(a_type) for name in ("gemm_a", "gemm_a1", "conv_x")}


def probe_variant(form: str, weight_bits: int = 8) -> Dict[str, OpOutcome]:
    """Runs the probe of one form through ONNX Runtime (CPU, 1 thread, all graph optimizations)."""
    import onnxruntime as ort

    data = probe_inputs(weight_bits)
    references = probe_references(data)
    model, feeds = build_probe_model(form, weight_bits, data)
    errors: Dict[str, int] = {}
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(None, feeds)))
    except Exception as exc:  # noqa: BLE001 - an unsupported type in this ORT build: the form is unusable here
        logger.warning("ONNX Runtime could not run the %s probe (%s): treating the form as inexact", form, str(exc)[:200])
        return {op: OpOutcome(False, -1) for op in PROBED_OPS}
    for name, expected in references.items():
        got = np.asarray(results[name]).astype(np.float64)
        if form == "s8s8" and name.startswith("QLinearConv"):
            got = got + 128  # an INT8 output with zero point 0: the UINT8 reference minus 128
        if got.shape != expected.shape or not np.all(np.isfinite(got)):
            error = _MAX_ERROR
        else:
            error = int(min(np.ceil(np.abs(got - expected).max()), _MAX_ERROR))
        op = name.split("/")[0]
        errors[op] = max(errors.get(op, 0), error)
    return {op: OpOutcome(errors[op] == 0, errors[op]) for op in PROBED_OPS}


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
    """``$QUANTLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/quantlab``, else ``~/.cache/quantlab``; + the file name."""
    root = os.environ.get("QUANTLAB_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "quantlab") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "quantlab")
    return Path(root) / CACHE_NAME


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
    from quantlab._io import write_text_atomic

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
    "build_probe_model", "cache_file", "cache_key", "cached_probe", "choose_form", "chosen_on", "probe",
    "probe_inputs", "probe_references", "probe_variant", "read_cache", "read_cpu_info", "resolve_form",
    "variant_of", "write_cache",
]
