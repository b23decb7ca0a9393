"""Uploaded run inputs (quantlab.jobs.inputs), column-naming data specs and layer descriptions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlab.data import load_data
from quantlab.data.spec import columns_spec
from quantlab.evaluation.layer_info import describe_layers, describe_module
from quantlab.jobs.errors import JobInputError
from quantlab.jobs.inputs import check_model_file, check_weights_file, csv_header, save_upload


def test_layer_descriptions_name_type_and_shape():
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, groups=32),
                          nn.BatchNorm2d(32), nn.Conv2d(32, 64, (1, 3), groups=2), nn.Flatten(), nn.Linear(10, 2))
    assert describe_layers(model) == {"0": "Conv2d 1→32 3×3", "2": "Conv2d dw 32 3×3 s2", "3": "BatchNorm2d weight 32",
                                      "4": "Conv2d 32→64 1×3 g2", "6": "Linear 10→2"}
    assert describe_module(nn.ReLU()) == "ReLU"


def test_columns_spec_round_trips_odd_names(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a b,c&d,e=f,label\n1,2,3,0\n4,5,6,1\n")
    spec = columns_spec(f"csv:{path}", ["e=f", "a b"], "label", limit=1)
    x, y = next(iter(load_data(spec, batch_size=4)))
    assert x.tolist() == [[3.0, 1.0]] and y.tolist() == [0]
    with pytest.raises(ValueError, match="both an input and the label"):
        columns_spec(f"csv:{path}", ["a b", "label"], "label")
    with pytest.raises(ValueError, match="do not pass columns"):
        load_data(spec, batch_size=4, columns=("a b", "label"))
    unlabeled = columns_spec(f"csv:{path}", ["c&d"], None)
    assert next(iter(load_data(unlabeled, batch_size=4)))[0].tolist() == [2.0, 5.0]  # one input column: one value each


def test_uploads_are_content_addressed_and_never_overwritten(tmp_path):
    first = save_upload(b"a,b\n1,2\n", "../../etc/t.csv", tmp_path)
    assert first.parent.parent == tmp_path.resolve() and first.name == "t.csv"
    assert save_upload(b"a,b\n1,2\n", "t.csv", tmp_path) == first
    other = save_upload(b"a,b\n3,4\n", "t.csv", tmp_path)
    assert other != first and first.read_bytes() == b"a,b\n1,2\n"
    with pytest.raises(JobInputError, match="empty"):
        save_upload(b"", "x.csv", tmp_path)


def test_model_files_are_told_apart_by_their_bytes(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    torch.jit.save(torch.jit.script(model), tmp_path / "m.pt")
    torch.export.save(torch.export.export(model, (torch.randn(1, 3),)), tmp_path / "m.pt2")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "ok.py").write_text("def build():\n    return 1\n")
    (tmp_path / "bad.py").write_text("def build(:\n")
    assert check_model_file(tmp_path / "m.pt").kind == "torchscript"
    assert check_model_file(tmp_path / "m.pt2").kind == "exported"
    assert check_model_file(tmp_path / "ok.py").runs_code
    with pytest.raises(JobInputError, match="line 1"):
        check_model_file(tmp_path / "bad.py")
    with pytest.raises(JobInputError, match="state_dict"):
        check_model_file(tmp_path / "sd.pt")
    assert check_weights_file(tmp_path / "sd.pt") == tmp_path / "sd.pt"
    with pytest.raises(JobInputError, match="not a torch.save archive"):
        check_weights_file(tmp_path / "ok.py")


def test_csv_header_is_checked(tmp_path):
    good = tmp_path / "g.csv"
    good.write_bytes("\ufeffa,b,label\n1,2,3\n".encode())
    assert csv_header(good) == ["a", "b", "label"]
    for text, message in [("a\n1\n", "at least two"), ("a,,b\n", "no name"), ("a,a\n", "repeated")]:
        path = tmp_path / "b.csv"
        path.write_text(text)
        with pytest.raises(JobInputError, match=message):
            csv_header(path)
    binary = tmp_path / "x.csv"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(JobInputError, match="UTF-8"):
        csv_header(binary)
