"""load_data spec strings, HF local formats, registry and errors."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from quantlab.data import DataNotFoundError, load_data, register_dataset, registered_datasets
from quantlab.data import spec as spec_mod
from quantlab.data.errors import EmptyDataError, HubUnreachableError


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    return pd.DataFrame({"f0": rng.normal(size=10), "f1": rng.normal(size=10), "f2": rng.normal(size=10),
                         "label": np.arange(10) % 3})


def test_csv_defaults_stack_numeric_columns(tmp_path, table):
    path = tmp_path / "calib.csv"
    table.to_csv(path, index=False)
    loader = load_data(f"csv:{path}", batch_size=4)
    assert isinstance(loader, DataLoader)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    x, y = _all(batches)
    assert x.shape == (10, 3) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x[:, 0], torch.tensor(table.f0.values, dtype=torch.float32))
    assert y.tolist() == table.label.tolist()


def test_csv_columns_limit_and_string_labels(tmp_path, table):
    table["label"] = ["cat", "dog", "ant", "cat", "dog", "ant", "cat", "dog", "ant", "cat"]
    path = tmp_path / "named.csv"
    table.to_csv(path, index=False)
    x, y = _all(load_data(f"csv:{path}[:4]", columns=(["f0", "f1"], "label")))
    assert x.shape == (4, 2)
    assert y.tolist() == [1, 2, 0, 1]  # sorted names: ant, cat, dog
    x, _ = _all(load_data(str(path), columns={"inputs": "f2"}, limit=3))  # bare path, suffix infers csv
    assert x.shape == (3,)


def test_parquet_list_column_with_reshape(tmp_path):
    frame = pd.DataFrame({"x": [list(np.arange(4.0) + i) for i in range(6)], "labels": list(range(6))})
    path = tmp_path / "data.parquet"
    frame.to_parquet(path)
    x, y = _all(load_data(f"parquet:{path}", batch_size=4, input_shape=(1, 2, 2)))
    assert x.shape == (6, 1, 2, 2) and y.tolist() == list(range(6))
    assert x[1].flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_json_lines_without_labels(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"pixels": [i, i + 1, i + 2]}) for i in range(5)))
    x, y = _all(load_data(f"json:{path}"))
    assert x.shape == (5, 3)
    assert (y == -1).all()  # NO_LABEL placeholder keeps batches (inputs, targets)


def test_arrow_saved_dataset(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"x": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], "label": [2, 1, 0]}).save_to_disk(tmp_path / "saved")
    x, y = _all(load_data(f"arrow:{tmp_path / 'saved'}", batch_size=2))
    assert x.shape == (3, 2) and y.tolist() == [2, 1, 0]


def test_imagefolder_tensors_in_unit_range(tmp_path):
    root = tmp_path / "imgs"
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 6), color).save(root / cls / f"{i}.png")
    x, y = _all(load_data(f"imagefolder:{root}", batch_size=3))
    assert x.shape == (4, 3, 6, 8) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert sorted(y.tolist()) == [0, 0, 1, 1]
    red = x[y == 0]
    assert torch.allclose(red[:, 0], torch.ones_like(red[:, 0]))
    x, _ = _all(load_data(f"imagefolder:{root}", image_size=4, image_mode="L"))
    assert x.shape == (4, 1, 4, 4)


def test_fmnist_spec(real_fmnist_dir):
    loader = load_data("fmnist:test[:100]", batch_size=32)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [32, 32, 32, 4]
    assert batches[0][0].shape == (32, 1, 28, 28)
    x, _ = _all(load_data("fmnist", split="calib", batch_size=512))
    assert x.shape[0] == 1024
    with pytest.raises(ValueError, match="conflicting"):
        load_data("fmnist:test", split="calib")


def test_unknown_prefix_lists_known(tmp_path):
    with pytest.raises(ValueError, match="unknown data spec prefix 'nope'.*csv.*fmnist"):
        load_data("nope:whatever")
    with pytest.raises(ValueError, match="cannot interpret"):
        load_data(str(tmp_path / "thing.xyz"))


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "missing.csv"
    with pytest.raises(DataNotFoundError, match="missing.csv"):
        load_data(f"csv:{missing}")
    with pytest.raises(DataNotFoundError, match="no_images"):
        load_data(f"imagefolder:{tmp_path / 'no_images'}")
    with pytest.raises(DataNotFoundError, match="nosaved"):
        load_data(f"arrow:{tmp_path / 'nosaved'}")


@pytest.mark.parametrize("name,content", [("h.csv", "a,b,label\n"), ("z.jsonl", ""), ("blank.csv", "\n\n")])
def test_empty_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    fmt = "csv" if name.endswith(".csv") else "json"
    with pytest.raises(EmptyDataError, match=f"calibration data is empty: {fmt}:.*{name}"):
        load_data(f"{fmt}:{path}")


def test_empty_parquet_and_empty_sources(tmp_path):
    path = tmp_path / "none.parquet"
    pd.DataFrame({"a": pd.Series([], dtype="float32")}).to_parquet(path)
    with pytest.raises(EmptyDataError, match="calibration data is empty"):
        load_data(f"parquet:{path}")
    with pytest.raises(EmptyDataError, match="calibration data is empty"):
        load_data(TensorDataset(torch.zeros(0, 3)))
    with pytest.raises(EmptyDataError):
        load_data([])


def test_hub_offline_gives_clear_message():
    with pytest.raises(HubUnreachableError, match="Hugging Face Hub.*(unreachable|offline)"):
        load_data("hub:someone/some-dataset")


def test_pass_through_and_wrapping():
    loader = DataLoader(TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), batch_size=2)
    assert load_data(loader) is loader
    batches = [(torch.zeros(2, 2), torch.zeros(2))]
    assert load_data(batches) is batches
    wrapped = load_data(TensorDataset(torch.ones(5, 2), torch.arange(5)), batch_size=2)
    assert isinstance(wrapped, DataLoader) and len(wrapped) == 3
    with pytest.raises(TypeError):
        load_data(42)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.ones(2), torch.tensor(1))] * 5)

    assert [len(b[1]) for b in load_data(Stream(), batch_size=2)] == [2, 2, 1]


def test_register_dataset(monkeypatch):
    monkeypatch.setattr(spec_mod, "_REGISTRY", dict(spec_mod._REGISTRY))  # keep the global registry clean
    seen = {}

    def toy(argument, *, split=None, **options):
        seen.update(argument=argument, split=split, options=options)
        return TensorDataset(torch.arange(6.0).reshape(6, 1), torch.arange(6))

    register_dataset("toy", toy)
    assert "toy" in registered_datasets()
    x, y = _all(load_data("toy:abc[:4]", split="s", batch_size=3, flavour="x"))
    assert x.shape == (4, 1) and seen["argument"] == "abc" and seen["split"] == "s"
    assert seen["options"]["flavour"] == "x"
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("toy", toy)
    register_dataset("toy", toy, overwrite=True)
    with pytest.raises(ValueError, match="invalid dataset name"):
        register_dataset("bad name", toy)


def test_shuffle_is_seeded_and_leaves_global_rng_alone():
    data = TensorDataset(torch.arange(20.0), torch.arange(20))
    state = torch.get_rng_state()
    first = _all(load_data(data, shuffle=True, seed=3, batch_size=5))[1]
    second = _all(load_data(data, shuffle=True, seed=3, batch_size=5))[1]
    assert torch.equal(first, second) and not torch.equal(first, torch.arange(20))
    assert torch.equal(state, torch.get_rng_state())
