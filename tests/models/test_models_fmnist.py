"""The Fashion-MNIST demo CNN: architecture, cache handling and real accuracy."""

import importlib.util
import operator
from pathlib import Path

import pytest
import torch
from torch import nn

import quantlab.models.fmnist as fmnist_mod
from quantlab.data.fmnist import DEFAULT_FMNIST_DIR
from quantlab.models import build_fmnist_cnn, default_cache_dir, pretrained_fmnist_cnn

REPO = Path(__file__).resolve().parents[2]


def test_forward_shape_and_layers():
    model = build_fmnist_cnn().eval()
    with torch.no_grad():
        assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.stride == (2, 2) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs)
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d) and isinstance(model.fc, nn.Linear)
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_residual_adds_are_traceable():
    graph = torch.fx.symbolic_trace(build_fmnist_cnn()).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert len(adds) >= 2
    for add in adds:
        main, shortcut = add.args
        assert main.target.endswith("bn2")  # main branch
        assert not shortcut.target.endswith("bn2")  # block input


def test_block_output_includes_shortcut():
    block = build_fmnist_cnn().eval().block1
    x = torch.randn(2, block.conv1.in_channels, 14, 14)
    with torch.no_grad():
        main = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))
        out = block(x)
    assert not torch.allclose(out, torch.relu(main))
    assert torch.allclose(out, torch.relu(main + x))


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("QUANTLAB_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "quantlab"


@pytest.fixture
def fake_training(monkeypatch):
    """Replace the minute-long training with a fresh model's weights."""
    calls = []

    def train(progress=None):
        calls.append(1)
        return build_fmnist_cnn().state_dict()

    monkeypatch.setattr(fmnist_mod, "_train_weights", train)
    return calls


def test_missing_cache_trains_once_and_writes_atomically(tmp_path, fake_training):
    pretrained_fmnist_cnn(cache_dir=tmp_path)
    model = pretrained_fmnist_cnn(cache_dir=tmp_path)
    assert len(fake_training) == 1 and not model.training
    assert (tmp_path / fmnist_mod.WEIGHTS_FILE).is_file()
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_cache_warns_and_retrains(tmp_path, fake_training):
    (tmp_path / fmnist_mod.WEIGHTS_FILE).write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="retraining"):
        pretrained_fmnist_cnn(cache_dir=tmp_path)
    assert len(fake_training) == 1
    pretrained_fmnist_cnn(cache_dir=tmp_path)  # the rewritten cache now loads
    assert len(fake_training) == 1


def test_no_training_when_disallowed(tmp_path, fake_training):
    with pytest.raises(FileNotFoundError, match="train_if_missing=False"):
        pretrained_fmnist_cnn(cache_dir=tmp_path, train_if_missing=False)
    assert not fake_training


def test_pretrained_reaches_90_percent_on_real_test_set():
    """Uses the user cache; the first run ever trains the model (~1 min on 2 cores)."""
    if not (Path(DEFAULT_FMNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    from quantlab.data import load_fmnist

    spec = importlib.util.spec_from_file_location("examples_fmnist", REPO / "examples" / "fmnist.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.build()
    x, y = load_fmnist("test")
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.90
