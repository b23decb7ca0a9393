"""Quantized checkpoints: weights changed by PTQ algorithms, saved beside their scales and rebuilt from the factory."""
import copy
import json
import struct

import pytest
import torch

import quantlab as ql
from quantlab.algorithms import AlgorithmError
from quantlab.checkpoint import (
    CheckpointFormatError,
    CheckpointMismatchError,
    float_state_dict,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    save_ptq_files,
)
from quantlab.data import load_fmnist
from quantlab.errors import OutputPathError
from quantlab.models import pretrained_fmnist_cnn
from quantlab.pipeline.refine import restore_refinable_state
from quantlab.ptq import run_ptq
from quantlab.scales import Scales
from tests import ptq_algorithms
from tests.ptq_algorithms import ClampMin

ALGORITHMS = ("test-rescale", "test-clamp", "test-nudge")


@pytest.fixture
def algorithms(monkeypatch):
    ptq_algorithms.register(monkeypatch)


@pytest.fixture(scope="module")
def images():
    calib, _ = load_fmnist("calib[:256]")
    test, _ = load_fmnist("test[:256]")
    return [calib[i : i + 128] for i in range(0, 256, 128)], test


def _config(*names):
    return ql.int8_config("max").replace(algorithms=names, algorithm_params={"test-rescale": {"factor": 3.0}} if "test-rescale" in names else {})


@pytest.fixture
def saved(algorithms, images, tmp_path):
    """A PTQ run with all three test algorithms and two calibrators, saved: (folder, result, quantized model)."""
    batches, _ = images
    model = pretrained_fmnist_cnn().eval()
    result = run_ptq(model, batches, ["max", "percentile"], config=_config(*ALGORITHMS))
    files = save_ptq_files(result, model, tmp_path)
    return tmp_path, result, model, files


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def test_transforms_keep_the_fp32_function(algorithms, images):
    _, x = images
    model = pretrained_fmnist_cnn().eval()
    reference = _logits(model, x)
    ql.pipeline.transform(model, ql.algorithms.parse_algorithms("test-rescale,test-clamp"), None, _config("test-rescale", "test-clamp"))
    assert any(isinstance(m, ClampMin) for m in model.modules())
    torch.testing.assert_close(_logits(model, x), reference, rtol=1e-4, atol=1e-4)


def test_every_calibrator_gets_a_checkpoint_beside_its_scales(saved):
    folder, result, _, files = saved
    assert sorted(files) == ["model.max", "model.percentile", "scales.max", "scales.percentile"]
    info, _ = read_checkpoint(folder / "model.max.safetensors", tensors=False)
    assert info.calibrator == "max" and info.scales == "scales.max.json"
    assert info.algorithms() == list(ALGORITHMS)
    assert info.config.algorithm_params == (("test-rescale", (("factor", 3.0),)),)
    assert info.refinements[0]["details"]["loss"] == "nan"  # JSON-safe
    scales = Scales.load(folder / "scales.max.json")
    assert [r["name"] for r in scales.algorithms["transforms"]] == ["test-rescale", "test-clamp"]
    assert scales.changed_weights()


@pytest.mark.parametrize("calibrator", ["max", "percentile"])
def test_round_trip_gives_identical_outputs_and_scales(saved, images, calibrator):
    folder, result, quant, _ = saved
    _, x = images
    # The reference: the pipeline's own model with this calibrator's refined weights and ranges.
    reference_model = copy.deepcopy(quant)
    restore_refinable_state(reference_model, result.refined_weights[calibrator])
    ql.load_scales(reference_model, result.scales[calibrator])
    reference = _logits(reference_model, x)

    rebuilt = load_checkpoint(pretrained_fmnist_cnn().eval(), folder / f"model.{calibrator}.safetensors")
    assert any(isinstance(m, ClampMin) for m in rebuilt.modules())  # the structure came back
    assert rebuilt.stem[0].bias is not None  # and the bias the refiner added
    torch.testing.assert_close(_logits(rebuilt, x), reference, rtol=0, atol=0)
    again = ql.current_scales(rebuilt)
    assert {e.key: e.amax for e in again.entries} == {e.key: e.amax for e in result.scales[calibrator].entries}
    for key, tensor in float_state_dict(rebuilt).items():
        torch.testing.assert_close(tensor, float_state_dict(reference_model)[key], rtol=0, atol=0)


def test_calibrators_keep_their_own_refined_weights(saved):
    folder, _, _, _ = saved
    _, a = read_checkpoint(folder / "model.max.safetensors")
    _, b = read_checkpoint(folder / "model.percentile.safetensors")
    assert not torch.equal(a["fc.weight"], b["fc.weight"])


def test_plain_scales_on_the_fp32_model_do_not_reproduce_it(saved, images):
    # Why checkpoints exist: the scales alone on the factory's weights give another model.
    folder, result, _, _ = saved
    _, x = images
    ckpt = _logits(load_checkpoint(pretrained_fmnist_cnn().eval(), folder / "model.max.safetensors"), x)
    plain = pretrained_fmnist_cnn().eval()
    plain = ql.load_scales(plain, Scales.load(folder / "scales.max.json"))
    assert not torch.allclose(_logits(plain, x), ckpt)


def _rewrite(path, header_change=None, data_change=None, out=None):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = bytearray(raw[8 + n :])
    if header_change:
        header_change(header)
    if data_change:
        data_change(header, data)
    text = json.dumps(header).encode()
    target = out or path
    target.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))
    return target


def test_truncated_file_is_refused(saved):
    folder, _, _, _ = saved
    path = folder / "model.max.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_checkpoint(pretrained_fmnist_cnn(), path)
    path.write_bytes(raw[:5])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_checkpoint(pretrained_fmnist_cnn(), path)


def test_corrupt_header_is_refused(saved):
    folder, _, _, _ = saved
    path = folder / "model.max.safetensors"
    raw = bytearray(path.read_bytes())
    raw[20:30] = b"\xff" * 10
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointFormatError, match=str(path.name)):
        load_checkpoint(pretrained_fmnist_cnn(), path)


def test_nan_weights_are_refused(saved):
    folder, _, _, _ = saved
    path = folder / "model.max.safetensors"

    def poison(header, data):
        begin = header["fc.weight"]["data_offsets"][0]
        data[begin : begin + 4] = struct.pack("<f", float("nan"))

    _rewrite(path, data_change=poison)
    with pytest.raises(CheckpointFormatError, match="'fc.weight' holds 1 NaN/Inf"):
        load_checkpoint(pretrained_fmnist_cnn(), path)


def test_wrong_shape_is_refused_with_every_problem(saved):
    folder, _, _, _ = saved
    path = folder / "model.max.safetensors"

    def reshape(header):
        header["fc.weight"]["shape"] = list(reversed(header["fc.weight"]["shape"]))

    _rewrite(path, header_change=reshape)
    with pytest.raises(CheckpointMismatchError, match=r"'fc.weight': the checkpoint holds shape \(64, 10\), the model needs \(10, 64\)"):
        load_checkpoint(pretrained_fmnist_cnn(), path)


def test_a_checkpoint_for_another_model_is_refused(saved):
    folder, _, _, _ = saved
    from quantlab.models.fmnist import FmnistCNN

    with pytest.raises(CheckpointMismatchError, match="problem"):
        load_checkpoint(FmnistCNN(widths=(8, 16, 32)), folder / "model.max.safetensors")


def test_swapped_scales_file_is_refused(saved):
    folder, _, _, _ = saved
    (folder / "scales.max.json").write_bytes((folder / "scales.percentile.json").read_bytes())
    with pytest.raises(CheckpointMismatchError, match="SHA-256"):
        load_checkpoint(pretrained_fmnist_cnn(), folder / "model.max.safetensors")


def test_missing_scales_file_is_refused(saved):
    folder, _, _, _ = saved
    (folder / "scales.max.json").unlink()
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_checkpoint(pretrained_fmnist_cnn(), folder / "model.max.safetensors")


def test_unknown_algorithm_in_checkpoint_is_refused(saved, monkeypatch):
    folder, _, _, _ = saved
    monkeypatch.delitem(ql.algorithms.base._REGISTRY, "test-clamp")
    with pytest.raises(AlgorithmError, match="'test-clamp', which this quantlab does not have"):
        load_checkpoint(pretrained_fmnist_cnn(), folder / "model.max.safetensors")


@pytest.mark.parametrize("untie, message", [
    ([1], "untie record must be an object, got list"),
    ({"modules": "fc"}, "untie record: modules must be a list, got str"),
    ({"modules": [5]}, r"untie record: modules\[0\] must be an object with a module name, got 5"),
])
def test_a_malformed_untie_record_is_refused_naming_the_file(saved, untie, message):
    # The record comes from the file: it failed as an AttributeError ("internal error" on the CLI).
    folder, _, _, _ = saved
    path = folder / "model.max.safetensors"

    def add_smoothquant(header):
        document = json.loads(header["__metadata__"]["quantlab"])
        document["transforms"].append({"name": "smoothquant", "stage": "transform", "details": {"untie": untie}})
        header["__metadata__"]["quantlab"] = json.dumps(document)

    _rewrite(path, header_change=add_smoothquant)
    with pytest.raises(AlgorithmError, match=f"^{path}: smoothquant: the checkpoint's {message}"):
        load_checkpoint(pretrained_fmnist_cnn(), path)


def test_not_a_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointFormatError, match="not a quantlab checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointFormatError, match="not found"):
        read_checkpoint(tmp_path / "nothing.safetensors")


def test_output_path_equal_to_an_input_is_refused(saved, tmp_path):
    folder, result, model, _ = saved
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"x" * 16)
    with pytest.raises(OutputPathError, match="same file"):
        save_checkpoint(model, weights, calibrator="max", inputs={"--weights": weights})
    with pytest.raises(OutputPathError, match="same file as the scales file"):
        save_checkpoint(model, folder / "scales.max.json", calibrator="max", scales_path=folder / "scales.max.json")
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not ours")
    with pytest.raises(OutputPathError, match="not a quantlab checkpoint"):
        save_checkpoint(model, other, calibrator="max")
    assert other.read_bytes() == b"not ours"


def test_no_algorithms_no_checkpoint(images, tmp_path):
    batches, _ = images
    model = pretrained_fmnist_cnn().eval()
    result = run_ptq(model, batches, ["max"], config=ql.int8_config("max"))
    assert sorted(save_ptq_files(result, model, tmp_path)) == ["scales.max"]
    assert "algorithms" not in json.loads((tmp_path / "scales.max.json").read_text())
