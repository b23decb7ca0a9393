"""Natural-photo crops from the images that ship inside scikit-image and scikit-learn.

No ImageNet images ship in any package, so accuracy of an ImageNet classifier
after quantization is measured as agreement with its FP32 predictions (and the
KL divergence of its logits) on crops of real photos. The photos come from
``skimage.data`` (astronaut, coffee, rocket, the Hubble deep field, a retina,
a stereo pair of a motorcycle, grayscale camera/clock/coins/moon/brick/grass/
gravel, ...) and ``sklearn.datasets.load_sample_images`` (china, flower).

Splits, disjoint by photo (no calibration pixel is ever evaluated):
    * ``"calib"``: 256 crops of 6 photos (astronaut, coffee, china, camera, gravel, cell).
    * ``"eval"``: 640 crops of the other 13 photos.

Each crop is square, 35-100% of the photo's shorter side, at a seeded random
position, mirrored half of the time, resized (bilinear, antialiased) to
``image_size`` (default 240, EfficientNet-Lite1's input), and normalized as
TF-Lite image models expect: ``(x - 127) / 128`` (values in ``[-1, 1)``).
Grayscale photos are repeated on three channels. Samples are bare ``[3, S, S]``
float tensors (there are no labels). The crop boxes are drawn once from a fixed
seed, so every machine gets the same crops; pixels are cut when a sample is read.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

INSTALL = "pip install scikit-image scikit-learn"
CALIB_PHOTOS = ("astronaut", "coffee", "sklearn:china", "camera", "gravel", "cell")
EVAL_PHOTOS = ("chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left",
               "motorcycle_right", "sklearn:flower", "clock", "coins", "moon", "brick", "grass")
SPLIT_SIZES = {"calib": 256, "eval": 640}
DEFAULT_SIZE = 240
SEED = 2026
MIN_FRACTION = 0.35


def _load_photo(name: str) -> np.ndarray:
    """One photo as uint8 ``[H, W, 3]``."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ImportError(f"the photos data needs scikit-image and scikit-learn ({exc}): {INSTALL}") from None
    if name.startswith("sklearn:"):
        images = load_sample_images()
        index = [f.rsplit("/", 1)[-1].split(".")[0] for f in images.filenames].index(name.split(":", 1)[1])
        image = images.images[index]
    elif name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        image = left if name.endswith("left") else right
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def _photos(split: str) -> Tuple[torch.Tensor, ...]:
    names = CALIB_PHOTOS if split == "calib" else EVAL_PHOTOS
    return tuple(torch.from_numpy(_load_photo(n)).permute(2, 0, 1).contiguous() for n in names)


def crop_boxes(split: str, sizes: List[Tuple[int, int]], count: int) -> List[Tuple[int, int, int, int, bool]]:
    """``(photo, top, left, side, mirror)`` of each crop: photos in turn, seeded positions and sizes."""
    rng = np.random.RandomState(SEED + (0 if split == "calib" else 1))
    boxes = []
    for i in range(count):
        photo = i % len(sizes)
        h, w = sizes[photo]
        short = min(h, w)
        side = int(round(short * rng.uniform(MIN_FRACTION, 1.0)))
        top = int(rng.randint(0, h - side + 1))
        left = int(rng.randint(0, w - side + 1))
        boxes.append((photo, top, left, side, bool(rng.rand() < 0.5)))
    return boxes


class PhotoCrops(Dataset):
    """Seeded square crops of natural photos, normalized ``(x - 127) / 128``.

    Args:
        split: ``"calib"`` or ``"eval"`` (disjoint photos).
        image_size: Side of the returned crops in pixels.
    """

    def __init__(self, split: str = "eval", image_size: int = DEFAULT_SIZE) -> None:
        if split not in SPLIT_SIZES:
            raise ValueError(f"unknown photos split {split!r}: use photos:calib or photos:eval")
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"photos: image_size must be an integer >= 8, got {image_size!r}")
        self.split = split
        self.image_size = image_size
        self.photos = _photos(split)
        self.boxes = crop_boxes(split, [tuple(p.shape[1:]) for p in self.photos], SPLIT_SIZES[split])

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> torch.Tensor:
        photo, top, left, side, mirror = self.boxes[index]
        crop = self.photos[photo][:, top : top + side, left : left + side].float()[None]
        crop = F.interpolate(crop, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                             antialias=True)[0]
        if mirror:
            crop = crop.flip(-1)
        return (crop.clamp(0, 255) - 127.0) / 128.0


def photos_dataset(argument: str, *, split: Any = None, image_size: Any = None, **_: Any) -> Dataset:
    """Loader of ``photos:<split>`` specs (see :func:`quantlab.data.register_dataset`)."""
    name = (argument or split or "eval").strip()
    size = image_size if image_size is not None else DEFAULT_SIZE
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"photos crops are square: image_size={size!r}")
        size = size[0]
    return PhotoCrops(name, int(size))


def describe() -> Dict[str, Any]:
    """The photos of each split and the crop counts (recorded by benchmarks)."""
    return {"calib": list(CALIB_PHOTOS), "eval": list(EVAL_PHOTOS), "sizes": dict(SPLIT_SIZES),
            "normalization": "(x - 127) / 128", "seed": SEED}
