"""Files a dashboard user uploads as a run's input: saved once, checked before anything loads them.

Uploads land in a run-input folder (``<store folder>/inputs/<sha256 prefix>/<name>``):
content-addressed, so the same file uploaded twice is one file and an existing
input is never overwritten. Each kind of file is checked by reading bytes only,
never by loading it:

* a model ``.py`` must be UTF-8 Python that compiles (it is not run: importing
  it later runs its code, so the page asks the user to trust it first);
* a ``.pt``/``.pth``/``.ts`` model must be a TorchScript archive and a ``.pt2``
  an exported program; a pickled object (``torch.save(model)``, or the legacy
  non-zip format) is refused: loading it would mean unpickling untrusted code;
* a weights file must be a ``torch.save`` zip archive (it loads with
  ``weights_only=True``);
* a CSV must have a UTF-8 header of distinct, non-empty column names.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import List, Union

from quantlab.jobs.errors import JobInputError

MODEL_SUFFIXES = (".py", ".pt", ".pth", ".ts", ".pt2")
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin")
DATA_SUFFIXES = (".csv",)
MAX_HEADER_BYTES = 1_000_000


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """What an uploaded model file is.

    Attributes:
        path: The saved file.
        kind: ``"python"``, ``"torchscript"`` or ``"exported"``.
        runs_code: Whether using it imports/deserializes code the uploader wrote (ask the user to trust it).
        note: One line for the page (what it is, what loading it does).
    """

    path: Path
    kind: str
    runs_code: bool
    note: str


def _safe_name(filename: str) -> str:
    name = Path(str(filename).replace("\\", "/")).name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "upload"
    return name[:120]


def input_folder(store_path: Union[str, os.PathLike]) -> Path:
    """The run-input folder beside a run store file."""
    return Path(store_path).expanduser().resolve().parent / "inputs"


def save_upload(payload: bytes, filename: str, folder: Union[str, os.PathLike]) -> Path:
    """Saves ``payload`` as ``folder/<sha256[:16]>/<filename>`` (atomically) and returns the absolute path.

    The same bytes under the same name give the same path (written once); nothing existing is replaced.

    Raises:
        JobInputError: an empty file, or the folder cannot be written.
    """
    if not payload:
        raise JobInputError("upload", f"{filename} is empty")
    digest = hashlib.sha256(payload).hexdigest()[:16]
    target = Path(folder).expanduser().resolve() / digest / _safe_name(filename)
    if target.is_file() and target.stat().st_size == len(payload):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(payload)
            if target.exists():  # written meanwhile by another session: keep it
                os.unlink(tmp)
            else:
                os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise JobInputError("upload", f"cannot save {filename} into {target.parent}: {exc}") from None
    return target


def _zip_names(path: Path) -> List[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def check_model_file(path: Union[str, os.PathLike]) -> ModelFile:
    """Says what an uploaded model file is, by its bytes; refuses pickles and broken Python.

    Raises:
        JobInputError: naming the file and what to do instead.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise JobInputError("model", f"{path.name}: choose a {', '.join(MODEL_SUFFIXES)} file")
    if suffix == ".py":
        try:
            source = path.read_text(encoding="utf-8")
            compile(source, str(path), "exec")  # parses only: nothing runs
        except UnicodeDecodeError:
            raise JobInputError("model", f"{path.name} is not UTF-8 text") from None
        except SyntaxError as exc:
            raise JobInputError("model", f"{path.name} line {exc.lineno}: {exc.msg}") from None
        return ModelFile(path, "python", True, "Python file: starting the run imports it, which runs its code as you")
    names = _zip_names(path)
    if not names:
        raise JobInputError("model", f"{path.name} is not a TorchScript or exported-program archive (a pickle or another "
                                     "format); quantlab never unpickles model files: save the model with torch.jit.save "
                                     "or torch.export.save, or give a module:factory with a state_dict as weights")
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return ModelFile(path, "torchscript", True,
                         "TorchScript archive: loaded with torch.jit.load, which builds the graph the uploader saved")
    if any(n.endswith("models/model.json") or "/archive_format" in n for n in names):
        return ModelFile(path, "exported", True, "exported program (torch.export.save): loaded with torch.export.load")
    raise JobInputError("model", f"{path.name} is a torch.save archive (a pickled object or a state_dict), not a saved "
                                 "graph: loading a pickled module would run code from the file. Give the model as "
                                 "module:factory and this file as its weights (loaded with weights_only=True)")


def check_weights_file(path: Union[str, os.PathLike]) -> Path:
    """A weights upload must be a ``torch.save`` zip archive (it then loads with ``weights_only=True``).

    Raises:
        JobInputError: a legacy pickle or another format.
    """
    path = Path(path)
    names = _zip_names(path)
    if not any(n.endswith("data.pkl") for n in names):
        raise JobInputError("weights", f"{path.name} is not a torch.save archive of a state_dict (legacy pickles are "
                                       "refused: re-save it with torch.save(model.state_dict(), path))")
    return path


def csv_header(path: Union[str, os.PathLike]) -> List[str]:
    """The column names of a CSV file (its first line), checked.

    Raises:
        JobInputError: not UTF-8, no header, empty or repeated names, fewer than two columns.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(MAX_HEADER_BYTES)
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise JobInputError("data", f"{path.name} is not UTF-8 text") from None
    except OSError as exc:
        raise JobInputError("data", f"cannot read {path}: {exc}") from None
    first = text.splitlines()[0] if text.strip() else ""
    try:
        names = next(csv.reader(io.StringIO(first)), [])
    except csv.Error as exc:
        raise JobInputError("data", f"{path.name}: bad CSV header ({exc})") from None
    names = [n.strip() for n in names]
    if len(names) < 2:
        raise JobInputError("data", f"{path.name}: the first line must name at least two columns (inputs and a label), "
                                    f"got {names or 'nothing'}")
    if any(not n for n in names):
        raise JobInputError("data", f"{path.name}: a column has no name in the header")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise JobInputError("data", f"{path.name}: repeated column name(s) {repeated}")
    return names


__all__ = ["DATA_SUFFIXES", "MODEL_SUFFIXES", "ModelFile", "WEIGHTS_SUFFIXES", "check_model_file", "check_weights_file",
           "csv_header", "input_folder", "save_upload"]
