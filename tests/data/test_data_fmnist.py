"""Fashion-MNIST idx reading, validation and splits."""

import gzip

import numpy as np
import pytest
import torch

from quantlab.data import DataNotFoundError, load_fmnist
from quantlab.data.errors import CorruptDataError
from quantlab.data.fmnist import calib_indices, parse_split, read_idx_images, read_idx_labels


def test_reads_small_idx_files(tmp_path, idx_writer):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    path = idx_writer(tmp_path / "imgs.gz", images)
    labels = idx_writer(tmp_path / "labels.gz", np.array([0, 9, 4], dtype=np.uint8))
    assert np.array_equal(read_idx_images(path), images)
    assert read_idx_labels(labels).tolist() == [0, 9, 4]


def test_truncated_file_is_named(tmp_path, idx_writer):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    full = np.zeros((4, 28, 28), dtype=np.uint8)
    payload = gzip.decompress(idx_writer(path, full).read_bytes())
    path.write_bytes(gzip.compress(payload[:-100]))  # valid gzip, missing pixels
    with pytest.raises(CorruptDataError, match="train-images-idx3-ubyte.gz.*expected"):
        read_idx_images(path)


def test_cut_gzip_stream_is_named(tmp_path, idx_writer):
    path = idx_writer(tmp_path / "t10k-images-idx3-ubyte.gz", np.random.randint(0, 255, (50, 28, 28)))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptDataError, match="t10k-images-idx3-ubyte.gz"):
        read_idx_images(path)


def test_bad_magic_and_not_gzip(tmp_path, idx_writer):
    labels_as_images = idx_writer(tmp_path / "swapped.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(CorruptDataError, match="swapped.gz.*magic"):
        read_idx_images(labels_as_images)
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"definitely not gzip")
    with pytest.raises(CorruptDataError, match="garbage.gz"):
        read_idx_labels(garbage)


def test_out_of_range_label(tmp_path, idx_writer):
    path = idx_writer(tmp_path / "labels.gz", np.array([1, 12], dtype=np.uint8))
    with pytest.raises(CorruptDataError, match="labels.gz"):
        read_idx_labels(path)


def test_wrong_split_size_is_reported(tmp_path, idx_writer):
    idx_writer(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28), dtype=np.uint8))
    idx_writer(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(10, dtype=np.uint8))
    with pytest.raises(CorruptDataError, match="t10k-images-idx3-ubyte.gz"):
        load_fmnist("test", root=tmp_path)


def test_missing_dir_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_FMNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="apt-get install --no-install-recommends dataset-fashion-mnist"):
        load_fmnist("test")
    assert issubclass(DataNotFoundError, FileNotFoundError)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_fmnist("test", root=tmp_path)


def test_parse_split():
    assert parse_split("test") == ("test", None)
    assert parse_split("calib[:256]") == ("calib", 256)
    with pytest.raises(ValueError):
        parse_split("test[5:]")
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split"):
        load_fmnist("validation")


def test_calib_indices_are_stratified_and_interleaved():
    labels = np.repeat(np.arange(10), 5)  # class-sorted, worst case for "first N"
    idx = calib_indices(labels, size=20)
    assert labels[idx].tolist() == list(range(10)) * 2


def test_real_split_sizes_and_normalization(real_fmnist_dir):
    x, y = load_fmnist("test", root=real_fmnist_dir)
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    train_x, train_y = load_fmnist("train", root=real_fmnist_dir)
    assert train_x.shape[0] == 60_000
    assert torch.bincount(train_y).tolist() == [6000] * 10


def test_real_calib_is_fixed_balanced_subset_of_train(real_fmnist_dir):
    cx, cy = load_fmnist("calib", root=real_fmnist_dir)
    assert cx.shape == (1024, 1, 28, 28)
    assert torch.bincount(cy, minlength=10).min() >= 102
    train_x, train_y = load_fmnist("train", root=real_fmnist_dir)
    idx = torch.from_numpy(calib_indices(train_y.numpy()))
    assert torch.equal(cx, train_x[idx]) and torch.equal(cy, train_y[idx])
    again_x, _ = load_fmnist("calib", root=real_fmnist_dir)
    assert torch.equal(cx, again_x)


def test_real_count_suffix(real_fmnist_dir):
    x, y = load_fmnist("test[:1000]", root=real_fmnist_dir)
    full_x, _ = load_fmnist("test", root=real_fmnist_dir)
    assert x.shape[0] == 1000 and y.shape[0] == 1000
    assert torch.equal(x, full_x[:1000])
    cx, cy = load_fmnist("calib[:256]", root=real_fmnist_dir)
    assert cx.shape[0] == 256 and torch.bincount(cy).min() >= 25
