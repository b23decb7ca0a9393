"""photos: spec: natural-photo crops from scikit-image / scikit-learn, seeded, disjoint calib/eval photos."""
import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from quantlab.data import load_data  # noqa: E402
from quantlab.data.photos import CALIB_PHOTOS, EVAL_PHOTOS, PhotoCrops  # noqa: E402


def test_eval_and_calib_specs():
    evaluation = load_data("photos:eval", batch_size=2)
    calib = load_data("photos:calib", batch_size=2)
    assert len(evaluation.dataset) >= 500 and len(calib.dataset) >= 128
    assert not set(CALIB_PHOTOS) & set(EVAL_PHOTOS)  # no photo is in both
    batch = next(iter(evaluation))
    assert isinstance(batch, torch.Tensor) and batch.shape == (2, 3, 240, 240)  # no labels: bare inputs
    assert -1.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    assert float(batch.std()) > 0.05  # a photo, not a flat image


def test_crops_are_deterministic_and_distinct():
    a, b = PhotoCrops("eval"), PhotoCrops("eval")
    torch.testing.assert_close(a[7], b[7])
    assert not torch.equal(a[7], a[8])
    assert len({box for box in a.boxes}) == len(a.boxes)


def test_size_option_and_bad_split():
    assert load_data("photos:calib[:3]", image_size=64, batch_size=3).dataset[0].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="unknown photos split"):
        load_data("photos:train")
