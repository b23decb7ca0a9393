"""Fashion-MNIST reader for the gzipped idx files shipped by Debian.

The files come from the ``dataset-fashion-mnist`` package and live in
``/usr/share/datasets/fashion-mnist`` unless ``QUANTLAB_FMNIST_DIR`` points
elsewhere. Reading is pure Python + NumPy so the demo works offline.

Splits:
    * ``"train"``: the 60,000 training images.
    * ``"test"``: the 10,000 test images.
    * ``"calib"``: 1,024 training images chosen deterministically and
      stratified by class: the first images of each class in file order,
      interleaved round-robin (class 0, 1, ..., 9, 0, 1, ...). Any prefix such
      as ``"calib[:256]"`` therefore stays class-balanced. No RNG is involved,
      so the subset is identical on every machine.

Any split accepts a count suffix, e.g. ``"test[:1000]"`` keeps the first
1,000 samples of that split.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from quantlab.data.errors import FMNIST_INSTALL_HINT, CorruptDataError, DataNotFoundError

DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_DIR_ENV = "QUANTLAB_FMNIST_DIR"

# Lower bound of the per-image std, as in tf.image.per_image_standardization
# (1/sqrt(pixels)); it only matters for a (near-)uniform image.
MIN_STD = 1.0 / 28.0
CALIB_SIZE = 1024
NUM_CLASSES = 10
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
# idx magic numbers: 0x08 = unsigned byte, last byte = number of dimensions.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_SPLIT_RE = re.compile(r"^\s*(\w+)\s*(?:\[\s*:\s*(\d+)\s*\])?\s*$")


def fmnist_dir(root: str | os.PathLike | None = None) -> Path:
    """Return the directory holding the idx files.

    Args:
        root: Explicit directory; overrides the environment and default.

    Returns:
        ``root``, else ``$QUANTLAB_FMNIST_DIR``, else the Debian location.
    """
    if root is not None:
        return Path(root)
    return Path(os.environ.get(FMNIST_DIR_ENV) or DEFAULT_FMNIST_DIR)


def parse_split(split: str) -> tuple[str, int | None]:
    """Split ``"test[:1000]"`` into ``("test", 1000)``.

    Args:
        split: Split name with an optional ``[:N]`` count suffix.

    Returns:
        The base split name and the count (``None`` when absent).

    Raises:
        ValueError: If the string is not of that form.
    """
    match = _SPLIT_RE.match(split)
    if not match:
        raise ValueError(f"bad split {split!r}: expected a name like 'test' or 'test[:1000]'")
    count = int(match.group(2)) if match.group(2) is not None else None
    return match.group(1), count


def _read_gz(path: Path) -> bytes:
    if not path.is_file():
        raise DataNotFoundError(
            f"Fashion-MNIST file not found: {path}. Install it with "
            f"`{FMNIST_INSTALL_HINT}` or set {FMNIST_DIR_ENV} to a directory holding the idx files."
        )
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    # A truncated or non-gzip file surfaces as any of these, depending on where it breaks.
    except (OSError, EOFError, zlib.error) as exc:
        raise CorruptDataError(f"corrupt Fashion-MNIST file {path}: cannot decompress ({exc})") from exc


def _header(path: Path, data: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    header_len = 4 + 4 * ndim
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        shown = "missing" if found is None else f"{found:#010x}"
        raise CorruptDataError(f"corrupt Fashion-MNIST file {path}: magic number {shown}, expected {magic:#010x}")
    if len(data) < header_len:
        raise CorruptDataError(f"corrupt Fashion-MNIST file {path}: {len(data)} bytes, shorter than the idx header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header_len + int(np.prod(dims))
    if len(data) != expected:
        raise CorruptDataError(
            f"corrupt Fashion-MNIST file {path}: {len(data)} bytes after decompression, "
            f"expected {expected} for shape {dims}"
        )
    return dims


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Read a gzipped idx3 image file.

    Args:
        path: Path to ``*-images-idx3-ubyte.gz``.

    Returns:
        A ``uint8`` array of shape ``[N, rows, cols]``.

    Raises:
        DataNotFoundError: If the file does not exist.
        CorruptDataError: If the file is truncated or has a bad header.
    """
    path = Path(path)
    data = _read_gz(path)
    dims = _header(path, data, _IMAGES_MAGIC, 3)
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(dims)


def read_idx_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a gzipped idx1 label file.

    Args:
        path: Path to ``*-labels-idx1-ubyte.gz``.

    Returns:
        A ``uint8`` array of shape ``[N]``.

    Raises:
        DataNotFoundError: If the file does not exist.
        CorruptDataError: If the file is truncated, has a bad header or bad labels.
    """
    path = Path(path)
    data = _read_gz(path)
    _header(path, data, _LABELS_MAGIC, 1)
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    if labels.size and labels.max() >= NUM_CLASSES:
        raise CorruptDataError(f"corrupt Fashion-MNIST file {path}: label {labels.max()} out of range 0..9")
    return labels


def _read_split(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file, size = _FILES[name]
    if not root.is_dir():
        raise DataNotFoundError(
            f"Fashion-MNIST directory not found: {root}. Install the data with "
            f"`{FMNIST_INSTALL_HINT}` or set {FMNIST_DIR_ENV}."
        )
    images = read_idx_images(root / images_file)
    labels = read_idx_labels(root / labels_file)
    if images.shape != (size, 28, 28) or labels.shape != (size,):
        raise CorruptDataError(
            f"unexpected Fashion-MNIST {name} sizes in {root}: images {images.shape} "
            f"({images_file}), labels {labels.shape} ({labels_file}); expected {size} 28x28 images"
        )
    return images, labels


def calib_indices(labels: np.ndarray, size: int = CALIB_SIZE) -> np.ndarray:
    """Pick a deterministic, class-stratified subset of training indices.

    Args:
        labels: Training labels in file order.
        size: Number of indices to return.

    Returns:
        Indices interleaved round-robin over classes, earliest samples first.
    """
    per_class = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    picked: list[int] = []
    rank = 0
    while len(picked) < size and any(rank < len(ix) for ix in per_class):
        picked.extend(int(ix[rank]) for ix in per_class if rank < len(ix))
        rank += 1
    return np.asarray(picked[:size], dtype=np.int64)


def normalize(images: np.ndarray) -> torch.Tensor:
    """Turn ``uint8 [N,28,28]`` images into the model's float input.

    Per-image standardization (``tf.image.per_image_standardization``): each
    image gets zero mean and unit std. With a dataset-wide mean/std instead,
    Fashion-MNIST's black background (about half of all pixels) maps to one
    constant, and after the stem's Conv+BN+ReLU to one constant per channel:
    spikes in the activation histograms that make TensorRT's KL (entropy)
    calibration clip the object pixels (about 11 points of top-1 lost). Per
    image, the background value depends on the image, so those spikes spread
    over many histogram bins and every calibrator stays within 0.2 point of FP32.

    Args:
        images: Raw pixel array.

    Returns:
        ``float32 [N,1,28,28]`` tensor, ``(x - mean(x)) / max(std(x), 1/28)`` per image.
    """
    # astype copies, so the tensor never aliases the read-only idx buffer.
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 255.0
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, correction=0).clamp_min(MIN_STD)
    return (x - mean) / std


def load_fmnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split as normalized tensors.

    Args:
        split: ``"train"``, ``"test"`` or ``"calib"``, optionally with a count
            suffix such as ``"test[:1000]"``.
        root: Directory of the idx files (default: ``$QUANTLAB_FMNIST_DIR`` or
            ``/usr/share/datasets/fashion-mnist``).

    Returns:
        ``(images, labels)``: ``float32 [N,1,28,28]`` and ``int64 [N]``.

    Raises:
        ValueError: Unknown split name.
        DataNotFoundError: The files are missing (message says how to install).
        CorruptDataError: A file is corrupt (message names it).
    """
    name, count = parse_split(split)
    if name not in ("train", "test", "calib"):
        raise ValueError(f"unknown Fashion-MNIST split {name!r}; expected 'train', 'test' or 'calib'")
    images, labels = _read_split(fmnist_dir(root), "test" if name == "test" else "train")
    if name == "calib":
        idx = calib_indices(labels)
        images, labels = images[idx], labels[idx]
    if count is not None:
        images, labels = images[:count], labels[:count]
    return normalize(images), torch.from_numpy(labels.astype(np.int64))
