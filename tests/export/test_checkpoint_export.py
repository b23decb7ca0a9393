"""Export of a quantized checkpoint (weights changed by PTQ algorithms): the Q/DQ ONNX passes ``quantlab check``
and matches the PyTorch fake-quantized model in ONNX Runtime, as the plain export does."""
import json

import numpy as np
import onnx
import pytest

from quantlab.checkpoint import load_checkpoint, save_ptq_files
from quantlab.cli.main import main
from quantlab.data import load_fmnist
from quantlab.export.check import check_model
from quantlab.jobs.export import run_export
from quantlab.models import pretrained_fmnist_cnn
from quantlab.ptq import run_ptq
import quantlab as ql
from tests import ptq_algorithms
from tests.export.helpers import ort_logits, torch_logits
from tests.export.test_qdq import MIRROR_MAX_LOGIT_DIFF, PLACED_MAX_LOGIT_DIFF

MODEL = "quantlab.models.fmnist:pretrained_fmnist_cnn"
ALGORITHMS = ("test-rescale", "test-clamp", "test-nudge")


@pytest.fixture(scope="module")
def registered():
    with pytest.MonkeyPatch.context() as monkeypatch:
        ptq_algorithms.register(monkeypatch)
        yield


@pytest.fixture(scope="module")
def run_folder(registered, tmp_path_factory):
    """scales + checkpoint of a percentile PTQ run of the demo CNN with the three test algorithms."""
    images, _ = load_fmnist("calib[:512]")
    model = pretrained_fmnist_cnn().eval()
    folder = tmp_path_factory.mktemp("ckpt-run")
    config = ql.int8_config("percentile").replace(algorithms=ALGORITHMS)
    result = run_ptq(model, [images[i : i + 128] for i in range(0, 512, 128)], ["percentile"], config=config)
    save_ptq_files(result, model, folder)
    return folder


@pytest.fixture(scope="module")
def exported(run_folder, test_set):
    out = run_folder / "model.int8.onnx"
    outcome = run_export(MODEL, out, checkpoint=str(run_folder / "model.percentile.safetensors"), data="fmnist:calib")
    reference = torch_logits(load_checkpoint(pretrained_fmnist_cnn().eval(), run_folder / "model.percentile.safetensors"), test_set[0])
    return outcome, reference


def test_checkpoint_export_passes_check_and_records_the_algorithms(exported):
    outcome, _ = exported
    assert outcome.status == 0 and outcome.check.errors == [], outcome.check.findings
    report = check_model(outcome.result.path)
    assert report.num_weighted == report.num_weighted_quantized == 8
    proto = onnx.load(str(outcome.result.path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    recorded = json.loads(meta["quantlab.algorithm_reports"])
    assert json.loads(meta["quantlab.algorithms"]) == list(ALGORITHMS)
    assert [r["name"] for r in recorded["transforms"] + recorded["refinements"]] == list(ALGORITHMS)
    assert recorded["calibrator"] == "percentile"


def test_checkpoint_export_matches_pytorch_fake_quant_in_onnx_runtime(exported, test_set):
    outcome, reference = exported
    logits = ort_logits(outcome.result.path, test_set[0])
    agreement = 100.0 * np.mean(reference.argmax(1) == logits.argmax(1))
    assert agreement >= 99.0, agreement
    assert np.abs(reference - logits).max() <= PLACED_MAX_LOGIT_DIFF


def test_mirror_export_of_a_checkpoint_matches_up_to_rounding_flips(run_folder, test_set, exported):
    _, reference = exported
    quant = load_checkpoint(pretrained_fmnist_cnn().eval(), run_folder / "model.percentile.safetensors")
    from quantlab.export.qdq import export_int8

    result = export_int8(quant, run_folder / "mirror.onnx", test_set[0][:2], placement=False)
    assert check_model(result.path).errors == []
    logits = ort_logits(result.path, test_set[0])
    assert 100.0 * np.mean(reference.argmax(1) == logits.argmax(1)) >= 99.5
    assert np.abs(reference - logits).max() <= MIRROR_MAX_LOGIT_DIFF


def test_scales_of_changed_weights_are_refused_without_their_checkpoint(run_folder, capsys):
    out = run_folder / "plain.onnx"
    code = main(["export", "--model", MODEL, "--scales", str(run_folder / "scales.percentile.json"), "--data", "fmnist:calib",
                 "--out", str(out)])
    assert code == 1 and "--checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_cli_export_of_a_checkpoint_and_out_equal_to_it(run_folder, capsys):
    checkpoint = str(run_folder / "model.percentile.safetensors")
    before = (run_folder / "model.percentile.safetensors").read_bytes()
    assert main(["export", "--model", MODEL, "--checkpoint", checkpoint, "--data", "fmnist:calib", "--out", checkpoint]) == 1
    assert "same file as --checkpoint" in capsys.readouterr().err
    assert (run_folder / "model.percentile.safetensors").read_bytes() == before
    out = run_folder / "cli.onnx"
    assert main(["export", "--model", MODEL, "--checkpoint", checkpoint, "--data", "fmnist:calib", "--out", str(out)]) == 0
    assert "check: 0 error(s)" in capsys.readouterr().out
