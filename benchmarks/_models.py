"""Benchmark models and their calibration batches, generated lazily per batch.

* ``fmnist``: the trained Fashion-MNIST demo CNN on real Fashion-MNIST images.
* ``resnet50``: a ResNet-50-shaped CNN (torchvision's layout, written with
  torch.nn because torchvision is not installable beside torch 2.13 here),
  random weights, 3x224x224 inputs.
* ``bert-base`` / ``minilm``: a BERT encoder (transformers BertModel, random
  init, eager attention) of BERT-base shape (12 layers, hidden 768) or MiniLM
  shape (6 layers, hidden 384) at sequence length 128.

Batches are made on demand from a per-batch seed, on the target device, so host
memory does not grow with the number of samples and every tool sees the same
inputs.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

MODELS = ("fmnist", "resnet50", "bert-base", "minilm")
SEQ_LEN = 128


# -- ResNet-50 shape ---------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Shape(nn.Module):
    """torchvision.models.resnet50's layers and shapes (25.6M parameters), random init."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers: List[nn.Module] = []
        in_ch = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(in_ch, width, stride if b == 0 else 1))
                in_ch = width * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():  # torchvision's init, so activations have realistic ranges
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_encoder(shape: str) -> nn.Module:
    from transformers import BertConfig, BertModel

    if shape == "bert-base":
        config = BertConfig(attn_implementation="eager")
    elif shape == "minilm":
        config = BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
            attn_implementation="eager",
        )
    else:
        raise ValueError(f"unknown encoder shape {shape!r}")
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False)
    return model


class EncoderOutput(nn.Module):
    """Wraps a BertModel so it returns only the last hidden state (ONNX-exportable, tensor out)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class SizedBatches:
    """Batches made on demand by ``make(device)``, with a length as a DataLoader has one
    (quantlab's forward_loop reads it to decide whether CUDA graphs pay off)."""

    def __init__(self, make: Callable[[torch.device], Iterator[Any]], device: torch.device, count: int) -> None:
        self.make, self.device, self.count = make, device, count

    def __iter__(self) -> Iterator[Any]:
        return iter(self.make(self.device))

    def __len__(self) -> int:
        return self.count


@dataclasses.dataclass
class Workload:
    """A model factory plus lazily generated calibration batches.

    Attributes:
        name: Model key.
        build: Returns a fresh FP32 model in eval mode (on the CPU).
        batches: ``batches(device)`` is a sized iterable of model inputs (a tensor or a dict of tensors).
        numpy_batches: Yields the same inputs as dicts of numpy arrays keyed by
            ONNX input name (for ONNX Runtime).
        input_names: ONNX input names.
        example: One input batch (for export).
    """

    name: str
    build: Callable[[], nn.Module]
    batches: Callable[[torch.device], SizedBatches]
    numpy_batches: Callable[[], Iterator[Dict[str, np.ndarray]]]
    input_names: List[str]
    example: Callable[[], Any]


def _split(samples: int, batch_size: int) -> List[int]:
    sizes = [batch_size] * (samples // batch_size)
    if samples % batch_size:
        sizes.append(samples % batch_size)
    return sizes


def make_workload(name: str, samples: int, batch_size: int) -> Workload:
    sizes = _split(samples, batch_size)
    if name == "fmnist":
        from quantlab.data.fmnist import load_fmnist
        from quantlab.models.fmnist import pretrained_fmnist_cnn

        split = "calib" if samples <= 1024 else f"train[:{samples}]"
        images, _ = load_fmnist(split)
        images = images[:samples].contiguous()

        def fmnist_batches(device: torch.device) -> Iterator[Any]:
            start = 0
            for n in sizes:
                yield images[start:start + n].to(device)
                start += n

        def fmnist_numpy() -> Iterator[Dict[str, np.ndarray]]:
            for x in fmnist_batches(torch.device("cpu")):
                yield {"input": x.numpy()}

        return Workload(name, lambda: pretrained_fmnist_cnn().eval(), lambda d: SizedBatches(fmnist_batches, d, len(sizes)), fmnist_numpy, ["input"], lambda: images[:1].clone())

    if name == "resnet50":
        def image_batch(i: int, n: int, device: torch.device) -> torch.Tensor:
            g = torch.Generator(device=device).manual_seed(1000 + i)
            return torch.randn(n, 3, 224, 224, generator=g, device=device)

        def resnet_batches(device: torch.device) -> Iterator[Any]:
            for i, n in enumerate(sizes):
                yield image_batch(i, n, device)

        def resnet_numpy() -> Iterator[Dict[str, np.ndarray]]:
            for x in resnet_batches(torch.device("cpu")):
                yield {"input": x.numpy()}

        def build_resnet() -> nn.Module:
            torch.manual_seed(0)
            return ResNet50Shape().eval()

        return Workload(name, build_resnet, lambda d: SizedBatches(resnet_batches, d, len(sizes)), resnet_numpy, ["input"], lambda: image_batch(0, 1, torch.device("cpu")))

    if name in ("bert-base", "minilm"):
        vocab = 30522

        def token_batch(i: int, n: int, device: torch.device) -> Dict[str, torch.Tensor]:
            g = torch.Generator(device=device).manual_seed(2000 + i)
            ids = torch.randint(1000, vocab, (n, SEQ_LEN), generator=g, device=device)
            # Variable lengths, so padding and the attention mask matter as in real text.
            lengths = torch.randint(SEQ_LEN // 4, SEQ_LEN + 1, (n, 1), generator=g, device=device)
            mask = (torch.arange(SEQ_LEN, device=device)[None, :] < lengths).to(torch.int64)
            return {"input_ids": ids * mask, "attention_mask": mask}

        def token_batches(device: torch.device) -> Iterator[Any]:
            for i, n in enumerate(sizes):
                yield token_batch(i, n, device)

        def token_numpy() -> Iterator[Dict[str, np.ndarray]]:
            for b in token_batches(torch.device("cpu")):
                yield {k: v.numpy() for k, v in b.items()}

        return Workload(
            name,
            lambda: EncoderOutput(build_encoder(name)).eval(),
            lambda d: SizedBatches(token_batches, d, len(sizes)),
            token_numpy,
            ["input_ids", "attention_mask"],
            lambda: token_batch(0, 1, torch.device("cpu")),
        )
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def call(model: nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(batch)


def run_batches(model: nn.Module, batches: Iterator[Any]) -> int:
    """Plain inference over the batches (no_grad); returns the number of batches."""
    count = 0
    with torch.no_grad():
        for batch in batches:
            call(model, batch)
            count += 1
    return count


def export_onnx(model: nn.Module, example: Any, input_names: List[str], path: str) -> None:
    """FP32 ONNX export (TorchScript exporter, dynamic batch), as ORT's quantizer expects."""
    args = tuple(example[k] for k in input_names) if isinstance(example, dict) else (example,)
    axes = {n: {0: "batch"} for n in input_names}
    axes["output"] = {0: "batch"}
    torch.onnx.export(
        model, args, path, input_names=input_names, output_names=["output"],
        dynamic_axes=axes, opset_version=17, dynamo=False,
    )


def quantized_model(wl: "Workload", device: torch.device, *, fp32_copy: bool = False) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The workload's model on ``device`` after one warm-up batch (kernels, allocator), with quantizers
    attached (off until calibrated); with ``fp32_copy``, also a copy taken before, without quantizers:
    FP32 inference as the user runs it (no input hooks, no weight parametrizations)."""
    import quantlab

    model = wl.build().to(device)
    run_batches(model, iter([next(iter(wl.batches(device)))]))
    fp32 = copy.deepcopy(model) if fp32_copy else None
    quantlab.quantize(model, quantlab.int8_config())
    return model, fp32
