"""Adapters from Hugging Face ``datasets`` to ``(input, target)`` torch samples.

``datasets`` is imported lazily so importing quantlab stays fast and the
Fashion-MNIST demo works without it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantlab.data.errors import CorruptDataError, DataNotFoundError, DataShapeError, EmptyDataError, HubUnreachableError

# Placeholder target for unlabeled data, so batches are always (inputs, targets).
NO_LABEL = -1

TARGET_COLUMNS = ("label", "labels", "target", "targets", "y", "class")
INPUT_COLUMNS = ("image", "img", "pixel_values", "pixels", "input", "inputs", "x", "features")
_EXTENSIONS = {
    "csv": (".csv",),
    "json": (".json", ".jsonl"),
    "parquet": (".parquet",),
}

Columns = Sequence[Any] | Mapping[str, Any] | None
ImageSize = int | tuple[int, int] | None


def _pick_split(data: Any, split: str | None, source: str) -> Any:
    """Choose one split of a ``DatasetDict``; pass a plain ``Dataset`` through."""
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict):
        return data
    if split is not None:
        if split not in data:
            raise ValueError(f"split {split!r} not in {source}; available: {sorted(data)}")
        return data[split]
    if len(data) == 1:
        return next(iter(data.values()))
    if "train" in data:
        return data["train"]
    raise ValueError(f"{source} has several splits {sorted(data)}; pass split=")


def _data_files(fmt: str, path: str) -> list[str]:
    """Expand a file, directory or glob into the files ``datasets`` should read."""
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        files = sorted(
            str(p) for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in _EXTENSIONS[fmt]
        )
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataNotFoundError(f"{fmt} data not found: {path}")
    if not files:
        raise DataNotFoundError(f"no {fmt} files found at {path}")
    return files


def _has_rows(fmt: str, path: str) -> bool:
    """Cheaply tell whether a data file holds at least one record.

    ``datasets`` reports empty inputs with unrelated errors (StopIteration,
    DatasetGenerationError, ...), so emptiness is checked up front.
    """
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if not head.strip():
        return False
    if fmt == "parquet":
        import pyarrow.parquet as pq  # a dependency of datasets

        try:
            return pq.ParquetFile(path).metadata.num_rows > 0
        except Exception:  # unreadable: let datasets report it as corrupt
            return True
    if fmt == "csv":
        with open(path, "rb") as fh:
            # More than a header line means at least one row.
            return sum(1 for line in fh if line.strip()) > 1
    return True


def load_hf_files(fmt: str, path: str, split: str | None = None, **load_kwargs: Any) -> Any:
    """Read local csv/json/parquet/imagefolder data with ``datasets.load_dataset``.

    ``datasets`` caches the parsed Arrow table under its cache directory
    (``HF_DATASETS_CACHE``); pass ``cache_dir=`` to put it elsewhere.

    Args:
        fmt: ``"csv"``, ``"json"``, ``"parquet"`` or ``"imagefolder"``.
        path: A file, a directory or a glob pattern.
        split: Split to return when the data has several.
        **load_kwargs: Forwarded to ``datasets.load_dataset``.

    Returns:
        A ``datasets.Dataset``.

    Raises:
        DataNotFoundError: ``path`` does not exist or holds no matching files.
        EmptyDataError: The files hold no records.
        CorruptDataError: ``datasets`` could not parse the files.
    """
    import datasets

    if fmt == "imagefolder":
        if not os.path.isdir(path):
            raise DataNotFoundError(f"image folder not found: {path}")
        source: dict[str, Any] = {"data_dir": path}
    else:
        files = _data_files(fmt, path)
        if not any(_has_rows(fmt, f) for f in files):
            raise EmptyDataError(f"calibration data is empty: {fmt}:{path}")
        source = {"data_files": files}
    try:
        data = datasets.load_dataset(fmt, **source, **load_kwargs)
    except datasets.exceptions.DataFilesNotFoundError as exc:
        raise DataNotFoundError(f"no {fmt} data found at {path}: {exc}") from exc
    except EmptyDataError:
        raise
    except Exception as exc:  # datasets raises many types for unparsable files
        raise CorruptDataError(f"could not read {fmt} data from {path}: {_root_cause(exc)}") from exc
    return _pick_split(data, split, path)


def _root_cause(exc: BaseException) -> str:
    """The innermost message of an exception chain (datasets wraps the parser's "line 3, saw 5")."""
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def load_hf_disk(path: str, split: str | None = None) -> Any:
    """Load a dataset written by ``Dataset.save_to_disk`` (Arrow directory).

    Args:
        path: The directory passed to ``save_to_disk``.
        split: Split to return for a saved ``DatasetDict``.

    Returns:
        A ``datasets.Dataset``.
    """
    import datasets

    if not os.path.isdir(path):
        raise DataNotFoundError(f"arrow dataset directory not found: {path}")
    try:
        data = datasets.load_from_disk(path)
    except Exception as exc:
        raise CorruptDataError(f"could not load arrow dataset from {path}: {exc}") from exc
    return _pick_split(data, split, path)


def load_hf_hub(name: str, split: str | None = None, **load_kwargs: Any) -> Any:
    """Load a dataset from the Hugging Face Hub by name.

    Args:
        name: Hub id such as ``"owner/name"``.
        split: Split to return.
        **load_kwargs: Forwarded to ``datasets.load_dataset``.

    Returns:
        A ``datasets.Dataset``.

    Raises:
        HubUnreachableError: The hub could not be reached or the dataset
            could not be fetched; the message carries the original error.
    """
    import datasets

    try:
        data = datasets.load_dataset(name, split=split, **load_kwargs)
    except Exception as exc:  # offline mode, DNS failure, 404 ... all mean "not available here"
        offline = datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        why = "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if offline else "the network/hub is unreachable"
        raise HubUnreachableError(
            f"could not load dataset {name!r} from the Hugging Face Hub: {why} "
            f"or the dataset does not exist ({type(exc).__name__}: {exc}). "
            "Use a local file instead, e.g. 'parquet:/path/data.parquet' or 'arrow:/path/saved_dir'."
        ) from exc
    return _pick_split(data, None, name)


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def resolve_columns(features: Mapping[str, Any], columns: Columns = None) -> tuple[list[str], str | None]:
    """Decide which columns form the input and which is the target.

    Args:
        features: The dataset's features (column name -> feature type).
        columns: ``None`` for defaults; a pair ``(inputs, target)``; or a
            mapping with keys ``"inputs"``/``"input"``/``"x"`` and
            ``"targets"``/``"target"``/``"label"``/``"y"``. ``inputs`` may be one
            name or a list of names (stacked into a vector); ``target`` may be
            ``None`` for unlabeled data.

    Returns:
        ``(input_columns, target_column_or_None)``.

    Raises:
        ValueError: A named column does not exist or no input column is found.
    """
    from datasets import Image, Value

    names = list(features)
    if isinstance(columns, Mapping):
        inputs = next((columns[k] for k in ("inputs", "input", "x") if k in columns), None)
        target = next((columns[k] for k in ("targets", "target", "label", "y") if k in columns), None)
        has_target = any(k in columns for k in ("targets", "target", "label", "y"))
    elif columns is not None:
        if len(columns) != 2:
            raise ValueError(f"columns must be (inputs, target), got {columns!r}")
        inputs, target = columns
        has_target = True
    else:
        inputs, target, has_target = None, None, False
    if not has_target:
        target = next((c for c in TARGET_COLUMNS if c in names), None)
    if inputs is None:
        image_cols = [c for c in names if isinstance(features[c], Image)]
        named = [c for c in INPUT_COLUMNS if c in names]
        if image_cols or named:
            inputs = (image_cols or named)[0]
        else:
            # Tabular data: every numeric column except the target is a feature.
            inputs = [
                c for c in names
                if c != target and isinstance(features[c], Value) and features[c].dtype not in ("string", "large_string")
            ]
    input_cols = _as_list(inputs)
    missing = [c for c in [*input_cols, target] if c is not None and c not in names]
    if missing:
        raise ValueError(f"column(s) {missing} not found; available columns: {names}")
    if not input_cols:
        raise ValueError(f"no input column found among {names}; pass columns=(inputs, target)")
    return input_cols, target


def image_to_tensor(image: Any, image_size: ImageSize = None, image_mode: str | None = None) -> torch.Tensor:
    """Convert a PIL image to a float ``[C,H,W]`` tensor in ``[0, 1]``.

    Args:
        image: A PIL image.
        image_size: Optional resize target, ``int`` (square) or ``(height, width)``.
        image_mode: Force a PIL mode (``"L"`` or ``"RGB"``); needed when a folder
            mixes grayscale and color images, since batches need one channel count.
            By default grayscale stays 1 channel and everything else becomes RGB.

    Returns:
        The image tensor.
    """
    if image_mode is not None:
        image = image.convert(image_mode)
    elif image.mode == "LA":
        image = image.convert("L")
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        image = image.resize((width, height))  # PIL takes (width, height)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def _to_tensor(value: Any, image_size: ImageSize, image_mode: str | None) -> torch.Tensor:
    if hasattr(value, "mode") and hasattr(value, "size"):  # PIL image, without importing PIL
        return image_to_tensor(value, image_size, image_mode)
    return torch.as_tensor(np.asarray(value, dtype=np.float32))


class HFTorchDataset(torch.utils.data.Dataset):
    """Map-style torch dataset yielding ``(input, target)`` from a HF dataset.

    String target columns are class-encoded (sorted label names -> 0..K-1,
    kept in :attr:`classes`).
    A missing target yields :data:`NO_LABEL` so batches keep one shape.
    """

    def __init__(
        self,
        data: Any,
        columns: Columns = None,
        image_size: ImageSize = None,
        input_shape: Sequence[int] | None = None,
        image_mode: str | None = None,
    ) -> None:
        """Wrap ``data``.

        Args:
            data: A ``datasets.Dataset``.
            columns: See :func:`resolve_columns`.
            image_size: Resize images to this size.
            input_shape: Reshape each input to this shape (e.g. ``(1, 28, 28)``
                for a CSV of 784 pixel columns).
            image_mode: See :func:`image_to_tensor`.
        """
        from datasets import Value

        self.input_cols, self.target_col = resolve_columns(data.features, columns)
        target_feature = data.features.get(self.target_col) if self.target_col else None
        self.classes: list[str] | None = None
        self._class_index: dict[str, int] | None = None
        if isinstance(target_feature, Value) and target_feature.dtype in ("string", "large_string"):
            # Encoded here rather than with class_encode_column, which rewrites the
            # Arrow cache and draws progress bars.
            self.classes = sorted(set(data[self.target_col]))
            self._class_index = {name: i for i, name in enumerate(self.classes)}
        self.data = data
        self.image_size = image_size
        self.image_mode = image_mode
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        #: Text columns left out of the features (named in shape errors).
        self.ignored_columns = [c for c in data.features if c not in self.input_cols and c != self.target_col]
        if columns is None:
            _refuse_mixed_columns(data, self.ignored_columns)
        if image_size is None and len(self.input_cols) == 1:
            _check_image_sizes(data, self.input_cols[0], image_mode)

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(input, target)`` for row ``index``."""
        row = self.data[int(index)]
        missing = [c for c in self.input_cols if row[c] is None]
        if missing:
            raise CorruptDataError(
                f"row {index} has no value in column(s) {', '.join(missing)} (a short or ragged line, or an empty cell)"
            )
        if len(self.input_cols) == 1:
            x = _to_tensor(row[self.input_cols[0]], self.image_size, self.image_mode)
        else:
            x = torch.as_tensor(np.asarray([row[c] for c in self.input_cols], dtype=np.float32))
        if self.input_shape is not None:
            x = x.reshape(self.input_shape)
        y = row[self.target_col] if self.target_col is not None else NO_LABEL
        if self._class_index is not None:
            y = self._class_index[y]
        return x, torch.as_tensor(y)


def _refuse_mixed_columns(data: Any, candidates: list[str], rows: int = 2000) -> None:
    """A text column whose values are mostly numbers is a data error, not a column to drop silently.

    (``csv`` types a column as text as soon as one cell is not a number: ``4,x,6``.)
    Only the first ``rows`` rows are looked at.
    """
    from datasets import Value

    for column in candidates:
        feature = data.features.get(column)
        if not isinstance(feature, Value) or feature.dtype not in ("string", "large_string"):
            continue
        values = data[column][:rows] if len(data) > rows else data[column]
        numeric, first_text = 0, None
        for i, value in enumerate(values):
            try:
                float(value)
                numeric += 1
            except (TypeError, ValueError):
                if first_text is None:
                    first_text = (i, value)
        if numeric and first_text is not None and numeric >= len(values) // 2:
            i, value = first_text
            raise CorruptDataError(
                f"column {column!r} mixes numbers and text (row {i} holds {str(value)[:40]!r}), so it is read as text and "
                "would be dropped from the features: fix the cell, or name the columns explicitly"
            )


def _check_image_sizes(data: Any, column: str, image_mode: str | None, limit: int = 100_000) -> None:
    """Every image of an image column has sample 0's size and channel count (read from headers only).

    Runs when the data is opened, so a folder with one image of another size fails
    before any pass, naming the sample and its file.
    """
    from datasets import Image

    feature = data.features.get(column)
    if not isinstance(feature, Image) or len(data) > limit:
        return
    from PIL import Image as PILImage

    raw = data.cast_column(column, Image(decode=False))[column]
    first = None
    for index, item in enumerate(raw):
        path = (item or {}).get("path")
        try:
            if item and item.get("bytes"):
                import io

                image = PILImage.open(io.BytesIO(item["bytes"]))
            elif path:
                image = PILImage.open(path)
            else:
                continue
            size, mode = image.size, image.mode
            image.close()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
            raise CorruptDataError(f"sample {index} ({path or 'embedded image'}) is not a readable image ({type(exc).__name__}: {exc})") from None
        channels = _channels(mode, image_mode)
        if first is None:
            first = (size, channels, path)
        elif (size, channels) != first[:2]:
            what = (f"{size[0]}x{size[1]} pixels where sample 0 ({first[2]}) has {first[0][0]}x{first[0][1]}: "
                    "resize them (image_size=(H, W))") if size != first[0] else \
                   (f"{channels} channel(s) where sample 0 ({first[2]}) has {first[1]}: give image_mode=\"RGB\" or \"L\"")
            raise DataShapeError(f"sample {index} ({path}) is {what}")


def _channels(mode: str, image_mode: str | None) -> int:
    mode = image_mode or ("L" if mode in ("L", "LA") else "RGB")  # as image_to_tensor converts
    return 1 if mode == "L" else 3
