"""Output paths checked before any work: never an input, never a folder, never a stranger's file.

    check_output_file(args.out, label="--out", inputs={"--onnx": args.onnx, "--scales": args.scales},
                      replace=ONNX_FILE)

Rules, each a one-line :class:`~quantlab.errors.OutputPathError`:

* the output is not any input (the same file after resolving symlinks and hard
  links: ``cache --out model.onnx --onnx model.onnx`` would replace the model);
* it is not an existing folder where a file is expected;
* its nearest existing parent is a writable folder (else the work would be lost
  at the very end);
* an existing file is replaced only where the command's semantics allow it,
  and only if it is the same kind of file (an ONNX model for ``export``, a
  calibration cache for ``cache``, ...): ``replace=None`` refuses every
  existing file.

Which commands replace what (README, "What quantlab guarantees"):

========================  ===========================================================
output                    an existing one is
========================  ===========================================================
export --out              replaced if it is an ``.onnx`` file (and its ``.json`` sidecar)
cache --out               replaced if it is a calibration cache (starts ``TRT-``)
build --out               replaced if it is a ``.plan``/``.engine`` file
report --out              replaced if it is an ``.html``/``.md`` report
calibrate/compare/qat/    run folders: replaced as a whole if quantlab wrote them
autoprecision/demo --out  (:func:`quantlab.store.runfolder.check_replaceable`)
========================  ===========================================================
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from quantlab.errors import OutputPathError

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass(frozen=True)
class Replaceable:
    """Which existing files an output may replace.

    Attributes:
        what: The kind, for messages ("an ONNX model").
        test: Whether an existing file is of that kind.
    """

    what: str
    test: Callable[[Path], bool]


def _suffix_in(*suffixes: str) -> Callable[[Path], bool]:
    return lambda p: p.suffix.lower() in suffixes


def _starts_with(prefix: bytes) -> Callable[[Path], bool]:
    def test(path: Path) -> bool:
        try:
            with open(path, "rb") as fh:
                return fh.read(len(prefix)) == prefix
        except OSError:
            return False

    return test


def _quantlab_json(format_name: str) -> Callable[[Path], bool]:
    def test(path: Path) -> bool:
        try:
            with open(path, "rb") as fh:
                head = fh.read(4096)
        except OSError:
            return False
        return f'"format": "{format_name}"'.encode() in head

    return test


ONNX_FILE = Replaceable("an .onnx model", _suffix_in(".onnx"))
EXPORT_SIDECAR = Replaceable("a quantlab export sidecar", _quantlab_json("quantlab.export"))
CALIBRATION_CACHE = Replaceable("a TensorRT calibration cache", _starts_with(b"TRT-"))
CACHE_SIDECAR = Replaceable("a quantlab calibration-cache sidecar", _quantlab_json("quantlab.calibration_cache"))
ENGINE_FILE = Replaceable("a .plan/.engine file", _suffix_in(".plan", ".engine", ".trt"))
REPORT_FILE = Replaceable("an .html/.md report", _suffix_in(".html", ".htm", ".md"))
SCALES_FILE = Replaceable("a quantlab scales file", _quantlab_json("quantlab.scales"))


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file (symlinks resolved; hard links by inode)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return os.path.realpath(pa) == os.path.realpath(pb)


def check_parent_writable(path: PathLike, label: str = "--out") -> None:
    """The nearest existing ancestor of ``path`` is a folder this process may create files in."""
    path = Path(os.path.abspath(path))
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{label} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{label} {path}: cannot write into {parent} (permission denied)")


def check_output_file(
    path: PathLike,
    *,
    label: str = "--out",
    inputs: Optional[Mapping[str, Optional[PathLike]]] = None,
    replace: Optional[Replaceable] = None,
) -> Path:
    """Checks one output file before the work (see the module docstring); returns it as a Path.

    Args:
        path: The output file.
        label: How the user named it (``--out``), for messages.
        inputs: ``{label: path}`` of every input of the command (None values ignored).
        replace: Which existing file may be replaced; None: none may.

    Raises:
        OutputPathError: one line saying what is wrong and what to do.
    """
    if path is None or str(path) == "":
        raise OutputPathError(f"{label} is empty: give a file path")
    out = Path(path)
    for name, source in (inputs or {}).items():
        if source is not None and str(source) != "" and same_file(out, source):
            raise OutputPathError(f"{label} {out} is the same file as {name} {source}: writing it would destroy the input; give another {label}")
    if out.is_dir():
        raise OutputPathError(f"{label} {out} is a folder; give a file path (e.g. {out / 'model.onnx'})" if replace is ONNX_FILE
                              else f"{label} {out} is a folder; give a file path")
    if out.exists() or out.is_symlink():
        if replace is None:
            raise OutputPathError(f"{label} {out} exists; this command does not replace files: give a new path")
        if not out.is_file() or not replace.test(out):
            raise OutputPathError(f"{label} {out} exists and is not {replace.what}: refusing to replace it; give a new path")
    check_parent_writable(out, label)
    return out


def spec_path(spec: Optional[str]) -> Optional[str]:
    """The local file or folder a model/data spec names, if any (for output-vs-input checks).

    ``net.py:build`` -> ``net.py``; ``csv:data.csv[:64]`` -> ``data.csv``; ``model.pt2`` -> itself;
    a spec naming no local path (``fmnist:calib``, ``package.module:factory``) -> None.
    """
    import re

    if not spec:
        return None
    text = re.sub(r"\[\s*:\s*\d+\s*\]\s*$", "", str(spec))
    head, sep, tail = text.partition(":")
    candidates = [text, tail if sep else None, head if sep and tail and not os.path.exists(text) else None]
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            return candidate
    module_file = text.rpartition(":")[0]
    return module_file if module_file and os.path.exists(module_file) else None


def check_distinct(outputs: Mapping[str, Optional[PathLike]]) -> None:
    """No two outputs of one command are the same file."""
    seen = {}
    for label, path in outputs.items():
        if path is None:
            continue
        for other, other_path in seen.items():
            if same_file(path, other_path):
                raise OutputPathError(f"{label} and {other} are the same file ({path}); give two different paths")
        seen[label] = path


__all__ = [
    "CALIBRATION_CACHE",
    "ENGINE_FILE",
    "EXPORT_SIDECAR",
    "ONNX_FILE",
    "REPORT_FILE",
    "Replaceable",
    "SCALES_FILE",
    "check_distinct",
    "check_output_file",
    "check_parent_writable",
    "same_file",
    "spec_path",
]
