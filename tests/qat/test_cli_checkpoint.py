"""``quantlab qat --checkpoint``: QAT starts from a quantized checkpoint (weights changed by PTQ algorithms)."""
import pytest

import quantlab as ql
from quantlab.checkpoint import save_ptq_files
from quantlab.cli.main import main
from quantlab.data import load_fmnist
from quantlab.models import pretrained_fmnist_cnn
from quantlab.ptq import run_ptq
from quantlab.scales import Scales
from tests import ptq_algorithms

MODEL = "quantlab.models.fmnist:pretrained_fmnist_cnn"


@pytest.fixture
def run_folder(monkeypatch, tmp_path):
    ptq_algorithms.register(monkeypatch)
    images, _ = load_fmnist("calib[:256]")
    model = pretrained_fmnist_cnn().eval()
    config = ql.int8_config("max").replace(algorithms=("test-clamp", "test-nudge"))
    result = run_ptq(model, [images[:128], images[128:]], ["max"], config=config)
    save_ptq_files(result, model, tmp_path / "ptq")
    return tmp_path / "ptq"


def _args(out, *extra):
    return ["qat", "--model", MODEL, "--data", "fmnist:train[:128]", "--eval", "fmnist:test[:128]", "--out", str(out),
            "--max-steps", "2", "--batch-size", "64", "--no-store", "--lr", "1e-5", *extra]


def test_qat_starts_from_the_checkpoint_and_its_scales(run_folder, tmp_path, capsys):
    out = tmp_path / "qat"
    assert main(_args(out, "--checkpoint", str(run_folder / "model.max.safetensors"))) == 0
    start = Scales.load(out / "scales.start.json")
    paired = Scales.load(run_folder / "scales.max.json")
    assert {e.key: e.amax for e in start.entries} == {e.key: e.amax for e in paired.entries}


def test_qat_refuses_scales_of_changed_weights_without_the_checkpoint(run_folder, tmp_path, capsys):
    out = tmp_path / "qat"
    assert main(_args(out, "--scales", str(run_folder / "scales.max.json"))) == 1
    assert "--checkpoint" in capsys.readouterr().err
    assert not out.exists()
