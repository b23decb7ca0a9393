"""Turn a data spec string (or an existing loader) into a torch DataLoader.

Spec strings have the form ``"<name>:<argument>"``:

* ``"fmnist:calib"``, ``"fmnist:test[:1000]"``: built-in Fashion-MNIST.
* ``"photos:calib"``, ``"photos:eval"``: unlabelled natural-photo crops
  (scikit-image / scikit-learn photos, 240x240, ``(x - 127) / 128``).
* ``"csv:data.csv"``, ``"json:rows.jsonl"``, ``"parquet:dir/"``: local files
  read with Hugging Face ``datasets`` (a file, a directory or a glob).
* ``"arrow:saved_dir"``: a directory written by ``Dataset.save_to_disk``.
* ``"imagefolder:images/"``: ``class_name/*.png`` folders; images become
  float ``[C,H,W]`` tensors in ``[0, 1]`` (resize with ``image_size=``).
* ``"hub:owner/name"``: ``datasets.load_dataset`` from the Hub (fails
  offline with a clear :class:`HubUnreachableError`).

A trailing ``[:N]`` keeps the first ``N`` samples of any spec. A table spec may
name its columns: ``"csv:data.csv?inputs=f1,f2,f3&label=y"`` (names URL-quoted;
``label=`` empty for unlabeled data; see :func:`columns_spec`). A bare path
with a ``.csv``/``.json``/``.jsonl``/``.parquet`` suffix, or a directory, is
accepted without a prefix. Batches are ``(inputs, targets)`` tuples.

New names are added with :func:`register_dataset`; the registry is the only
module state and holds no data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from quantlab.data.checked import CheckedDataset
from quantlab.data.errors import CorruptDataError, DataShapeError, EmptyDataError
from quantlab.data.fmnist import load_fmnist, parse_split
from quantlab.data.hf import HFTorchDataset, load_hf_disk, load_hf_files, load_hf_hub
from quantlab.data.photos import photos_dataset


class DatasetLoader(Protocol):
    """Signature of a function registered with :func:`register_dataset`."""

    def __call__(self, argument: str, *, split: str | None, **options: Any) -> Dataset | Iterable:
        """Build the data for ``"<name>:<argument>"``.

        Args:
            argument: Text after the colon (may be empty).
            split: The ``split=`` passed to :func:`load_data`, or None.
            **options: Remaining keyword options of :func:`load_data`
                (``columns``, ``image_size``, ``input_shape`` and extras);
                ignore the ones that do not apply.

        Returns:
            A map-style ``Dataset`` of ``(input, target)`` samples (batched
            for you) or a ready iterable of batches (passed through).
        """


_REGISTRY: dict[str, DatasetLoader] = {}
_LIMIT_RE = re.compile(r"^(.*)\[\s*:\s*(\d+)\s*\]\s*$", re.DOTALL)
_SUFFIX_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# "csv:data.csv?inputs=a,b&label=y": which columns are the input and the label (names URL-quoted).
_COLUMNS_RE = re.compile(r"^(.*)\?((?:inputs|label)=[^?]*)$", re.DOTALL)


def columns_spec(spec: str, inputs: list[str], label: str | None, *, limit: int | None = None) -> str:
    """A data spec that names its input columns and label column, e.g. ``csv:d.csv?inputs=a,b&label=y[:500]``.

    Args:
        spec: A table spec without columns or limit (``csv:/data/train.csv``).
        inputs: Input column names, in order (stacked into one vector per sample).
        label: The label column, or None for unlabeled data.
        limit: Keep the first ``limit`` samples (a ``[:N]`` suffix).

    Raises:
        ValueError: no input column, or the label among the inputs.
    """
    from urllib.parse import quote

    if not inputs:
        raise ValueError("choose at least one input column")
    if label is not None and label in inputs:
        raise ValueError(f"column {label!r} cannot be both an input and the label")
    text = f"{spec}?inputs={','.join(quote(c, safe='') for c in inputs)}&label={quote(label, safe='') if label else ''}"
    return f"{text}[:{int(limit)}]" if limit else text


def _split_columns(spec: str) -> tuple[str, dict[str, Any] | None]:
    """``(spec, columns)`` from a spec ending in ``?inputs=...&label=...`` (columns None when it does not)."""
    from urllib.parse import unquote

    match = _COLUMNS_RE.match(spec)
    if not match:
        return spec, None
    columns: dict[str, Any] = {}
    for part in match.group(2).split("&"):
        key, sep, value = part.partition("=")
        if not sep or key not in ("inputs", "label") or key in columns:
            raise ValueError(f"bad column selection {match.group(2)!r} in {spec!r}: expected inputs=A,B&label=C")
        if key == "inputs":
            names = [unquote(v) for v in value.split(",") if v]
            if not names:
                raise ValueError(f"no input column named in {spec!r}")
            columns["inputs"] = names
        else:
            columns["label"] = unquote(value) or None
    return match.group(1), columns


def register_dataset(name: str, loader_fn: DatasetLoader, *, overwrite: bool = False) -> None:
    """Make ``"<name>:..."`` specs resolve through ``loader_fn``.

    Args:
        name: Spec prefix (letters, digits, ``_`` and ``-``).
        loader_fn: See :class:`DatasetLoader`.
        overwrite: Replace an existing registration instead of raising.

    Raises:
        ValueError: Bad name, or the name is taken and ``overwrite`` is False.
    """
    if not re.fullmatch(r"[A-Za-z][\w-]*", name):
        raise ValueError(f"invalid dataset name {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset name {name!r} is already registered")
    _REGISTRY[name] = loader_fn


def registered_datasets() -> list[str]:
    """Return the known spec prefixes, sorted."""
    return sorted(_REGISTRY)


def _split_spec(spec: str) -> tuple[str, str]:
    """Return ``(name, argument)``, inferring the name for bare paths."""
    name, sep, argument = spec.partition(":")
    if sep and name in _REGISTRY:
        return name, argument
    if sep and re.fullmatch(r"[A-Za-z][\w-]*", name) and len(name) > 1:
        raise ValueError(f"unknown data spec prefix {name!r} in {spec!r}; known: {', '.join(registered_datasets())}")
    if not sep and spec in _REGISTRY:
        return spec, ""
    # No (known) prefix: treat the whole spec as a path and infer its format.
    suffix = os.path.splitext(spec)[1].lower()
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix], spec
    if os.path.isdir(spec):
        is_arrow = os.path.exists(os.path.join(spec, "dataset_info.json")) or os.path.exists(
            os.path.join(spec, "dataset_dict.json")
        )
        return ("arrow" if is_arrow else "imagefolder"), spec
    raise ValueError(
        f"cannot interpret data spec {spec!r}: expected '<name>:<argument>' with name one of "
        f"{', '.join(registered_datasets())}"
    )


def _check_nonempty(data: Any, spec: str) -> None:
    try:
        size = len(data)
    except TypeError:  # a generator or other unsized iterable: cannot tell without consuming it
        return
    if size == 0:
        raise EmptyDataError(f"calibration data is empty: {spec}")


def load_data(
    spec: str | Iterable | Dataset,
    *,
    batch_size: int = 64,
    split: str | None = None,
    limit: int | None = None,
    columns: Any = None,
    image_size: int | tuple[int, int] | None = None,
    input_shape: tuple[int, ...] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    **options: Any,
) -> Iterable:
    """Resolve a data spec into batches of ``(inputs, targets)``.

    Args:
        spec: A spec string (see module docs), a ``DataLoader`` or other
            iterable of batches (returned unchanged), or a map-style
            ``Dataset`` (wrapped in a ``DataLoader``).
        batch_size: Samples per batch.
        split: Split to use when the source has several (for ``fmnist``
            the default is ``"calib"``).
        limit: Keep only the first ``limit`` samples (like a ``[:N]`` suffix).
        columns: Input/target columns for table-like data; see
            :func:`quantlab.data.hf.resolve_columns`.
        image_size: Resize images (``int`` or ``(height, width)``).
        input_shape: Reshape each input sample, e.g. ``(1, 28, 28)``.
        shuffle: Shuffle samples (with a private generator seeded by ``seed``).
        seed: Seed for ``shuffle``.
        num_workers: DataLoader worker processes.
        drop_last: Drop a final partial batch.
        **options: Extra options forwarded to the registered loader, e.g.
            ``image_mode="RGB"`` for image folders mixing gray and color,
            ``root=`` for ``fmnist``, ``cache_dir=`` for ``datasets``.

    Returns:
        A ``DataLoader`` (or the iterable passed in).

    Raises:
        ValueError: Unknown spec prefix (lists the known ones) or bad options.
        DataNotFoundError: A named file or directory does not exist.
        EmptyDataError: The spec yields no samples.
        HubUnreachableError: A ``hub:`` dataset cannot be fetched.
    """
    if isinstance(spec, DataLoader):
        _check_nonempty(spec.dataset if hasattr(spec.dataset, "__len__") else spec, "<DataLoader>")
        return spec
    if isinstance(spec, str):
        label = spec
        match = _LIMIT_RE.match(spec)
        if match:
            spec, suffix_limit = match.group(1), int(match.group(2))
            limit = suffix_limit if limit is None else min(limit, suffix_limit)
        spec, spec_columns = _split_columns(spec.strip())
        if spec_columns is not None:
            if columns is not None and columns != spec_columns:
                raise ValueError(f"{label!r} names its columns; do not pass columns= as well")
            columns = spec_columns
        name, argument = _split_spec(spec.strip())
        try:
            data = _REGISTRY[name](
                argument, split=split, columns=columns, image_size=image_size, input_shape=input_shape, **options
            )
        except (CorruptDataError, DataShapeError) as exc:
            if label in str(exc):
                raise
            raise type(exc)(f"{label}: {exc}") from None
    elif isinstance(spec, Dataset):  # map-style or IterableDataset of samples: batch it
        label, data = f"<{type(spec).__name__}>", spec
    elif isinstance(spec, Iterable):
        _check_nonempty(spec, f"<{type(spec).__name__}>")
        return spec
    else:
        raise TypeError(f"data spec must be a string, Dataset or iterable, not {type(spec).__name__}")

    if isinstance(data, IterableDataset):
        if limit is not None or shuffle:
            raise ValueError(f"limit/shuffle need a sized, map-style dataset; {label!r} is iterable-only")
        return DataLoader(data, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last)
    if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        if limit is not None:
            raise ValueError(f"a sample limit needs a sized dataset; {label!r} yields ready batches")
        _check_nonempty(data, label)
        return data
    if limit is not None:
        data = Subset(data, range(min(limit, len(data))))
    _check_nonempty(data, label)
    if not isinstance(data, TensorDataset):  # a TensorDataset has one shape by construction
        data = CheckedDataset(data, label)  # reads sample 0 now: an unreadable first sample fails before any pass
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
    )


# ---- built-in loaders -------------------------------------------------------


def _fmnist(argument: str, *, split: str | None = None, root: str | None = None, **_: Any) -> Dataset:
    """``fmnist:<split>``; ``root=`` overrides the idx directory."""
    if argument and split and parse_split(argument)[0] != parse_split(split)[0]:
        raise ValueError(f"conflicting splits: spec says {argument!r}, split={split!r}")
    images, labels = load_fmnist(argument or split or "calib", root=root)
    return TensorDataset(images, labels)


def _hf_adapter(data: Any, options: dict[str, Any]) -> HFTorchDataset:
    return HFTorchDataset(
        data,
        columns=options.get("columns"),
        image_size=options.get("image_size"),
        input_shape=options.get("input_shape"),
        image_mode=options.get("image_mode"),
    )


_HF_OPTIONS = ("columns", "image_size", "input_shape", "image_mode")


def _file_loader(fmt: str) -> DatasetLoader:
    def load(argument: str, *, split: str | None = None, **options: Any) -> Dataset:
        if not argument:
            raise ValueError(f"'{fmt}:' needs a path, e.g. '{fmt}:/data/calib'")
        load_kwargs = {k: v for k, v in options.items() if k not in _HF_OPTIONS}
        return _hf_adapter(load_hf_files(fmt, argument, split, **load_kwargs), options)

    load.__doc__ = f"``{fmt}:<path>`` via ``datasets.load_dataset({fmt!r})``."
    return load


def _arrow(argument: str, *, split: str | None = None, **options: Any) -> Dataset:
    """``arrow:<dir>`` written by ``save_to_disk``."""
    return _hf_adapter(load_hf_disk(argument, split), options)


def _hub(argument: str, *, split: str | None = None, **options: Any) -> Dataset:
    """``hub:<owner/name>`` via ``datasets.load_dataset``."""
    if not argument:
        raise ValueError("'hub:' needs a dataset id, e.g. 'hub:owner/name'")
    load_kwargs = {k: v for k, v in options.items() if k not in _HF_OPTIONS}
    return _hf_adapter(load_hf_hub(argument, split, **load_kwargs), options)


register_dataset("fmnist", _fmnist)
register_dataset("photos", photos_dataset)
for _fmt in ("csv", "json", "parquet", "imagefolder"):
    register_dataset(_fmt, _file_loader(_fmt))
register_dataset("arrow", _arrow)
register_dataset("hub", _hub)

__all__: list[str] = ["DatasetLoader", "columns_spec", "load_data", "register_dataset", "registered_datasets"]
