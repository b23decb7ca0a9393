"""Fixtures for data tests: tiny idx files and the real Fashion-MNIST location."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from quantlab.data.fmnist import DEFAULT_FMNIST_DIR, FMNIST_DIR_ENV


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    """Write ``array`` (uint8) as an idx file with the right magic number."""
    magic = (0x0800 + array.ndim).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = magic + dims + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.fixture
def idx_writer():
    """Expose :func:`write_idx` to tests."""
    return write_idx


@pytest.fixture
def real_fmnist_dir() -> Path:
    """The installed Fashion-MNIST directory, or skip when it is absent."""
    root = Path(os.environ.get(FMNIST_DIR_ENV) or DEFAULT_FMNIST_DIR)
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed at {root}")
    return root
