"""ONNX Runtime on the CPU: FP32 vs INT8 (TensorRT Q/DQ form) vs INT8 (ort-cpu form).

Both INT8 files hold the same scales; the ort-cpu form stores activations as UINT8
with zero point 128 so ONNX Runtime's x86 integer kernels (QLinearConv, MatMulInteger)
run them. Models: the Fashion-MNIST demo CNN (trained, cached) and a ResNet-18-sized
CNN at 112x112 (torch.nn, random weights). Batch 1 and 64, 2 intra-op threads,
median latency; the sessions are timed in interleaved rounds so load changes on a
shared machine hit every column alike.

    .venv/bin/python benchmarks/bench_ort_int8.py [--threads 2] [--rounds 5] [--quick]

Prints a markdown table, the machine and versions, and the max |difference| between
the two INT8 forms' outputs.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

import quantlab as ql
from quantlab.export.float import export_float
from quantlab.export.qdq import export_int8
from quantlab.runtimes.onnxruntime_runner import OnnxRuntimeRunner, quantized_kernels


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18's layout (7x7 stem, max pool, 4 stages of 2 basic blocks, 11.7M parameters)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_random() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet18()
    for m in model.modules():  # plausible BN statistics so activations keep a sane scale
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.0)
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def models(quick: bool):
    from quantlab.data import load_fmnist
    from quantlab.models import pretrained_fmnist_cnn

    calib, _ = load_fmnist("calib[:256]")
    test, _ = load_fmnist("test[:64]")
    yield "demo CNN (Fashion-MNIST, 1x28x28)", pretrained_fmnist_cnn().eval(), calib, test
    if not quick:
        generator = torch.Generator().manual_seed(1)
        calib = torch.randn(64, 3, 112, 112, generator=generator)
        test = torch.randn(64, 3, 112, 112, generator=generator)
        yield "ResNet-18-sized CNN (3x112x112, random weights)", resnet18_random(), calib, test


def time_interleaved(runners, batch, rounds, iters, warmup=3):
    """Median ms per runner, timed round-robin."""
    samples = {name: [] for name in runners}
    for runner in runners.values():
        for _ in range(warmup):
            runner.run(batch)
    for _ in range(rounds):
        for name, runner in runners.items():
            for _ in range(iters):
                t0 = time.perf_counter()
                runner.run(batch)
                samples[name].append(time.perf_counter() - t0)
    return {name: 1000.0 * statistics.median(s) for name, s in samples.items()}


def cpu_flags() -> str:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags)


def main() -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="demo CNN only")
    parser.add_argument("--variants", action="store_true",
                        help="add columns: ort-cpu form with the convs QLinearConv cannot take as float Conv / ConvInteger")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, diffs, kernels = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_ort_int8_") as tmp:
        for label, fp32_model, calib, test in models(args.quick):
            quantized = copy.deepcopy(fp32_model)
            batches = [calib[i : i + 32] for i in range(0, len(calib), 32)]
            ql.quantize(quantized, ql.int8_config("percentile"), forward_loop=lambda m: [m(b) for b in batches])
            stem = Path(tmp) / str(len(rows))
            paths = {
                "FP32": export_float(fp32_model, f"{stem}.fp32.onnx", test[:2]).path,
                "INT8 tensorrt form": export_int8(quantized, f"{stem}.trt.onnx", test[:2]).path,
                "INT8 ort-cpu form": export_int8(quantized, f"{stem}.ort.onnx", test[:2], target="ort-cpu").path,
            }
            if args.variants:
                for variant in ("float", "conv-integer"):
                    paths[f"ort-cpu, {variant}"] = export_int8(quantized, f"{stem}.{variant}.onnx", test[:2], target="ort-cpu", ort_other_convs=variant).path
            runners = {name: OnnxRuntimeRunner(p, threads=args.threads) for name, p in paths.items()}
            outputs = {name: r.run(test.numpy())[0] for name, r in runners.items()}
            diffs.append((label, float(np.abs(outputs["INT8 tensorrt form"] - outputs["INT8 ort-cpu form"]).max()),
                          float(np.abs(outputs["FP32"]).max()),
                          float(np.mean(outputs["INT8 tensorrt form"].argmax(1) == outputs["INT8 ort-cpu form"].argmax(1)) * 100)))
            kernels.append((label, {n: quantized_kernels(p) for n, p in paths.items() if n != "FP32"}))
            for batch_size, iters in ((1, 20), (64, 3)):
                batch = test[:batch_size].numpy()
                ms = time_interleaved(runners, batch, args.rounds, iters)
                rows.append((label, batch_size, ms))
            for r in runners.values():
                r.close()
    print(f"\nONNX Runtime {ort.__version__} CPUExecutionProvider, {args.threads} intra-op threads; torch {torch.__version__}; "
          f"{cpu_model()} ({os.cpu_count()} logical CPUs; {cpu_flags()}); Python {platform.python_version()}")
    print(f"median latency (ms), {args.rounds} interleaved rounds; load average at end {os.getloadavg()[0]:.1f}\n")
    extra = " ort-cpu, residual convs float | ort-cpu, residual convs ConvInteger |" if args.variants else ""
    print("| model | batch | FP32 | INT8 tensorrt form | INT8 ort-cpu form | ort-cpu vs FP32 | tensorrt form vs FP32 |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|---|" if extra else ""))
    for label, batch_size, ms in rows:
        fp32, trt, cpu = ms["FP32"], ms["INT8 tensorrt form"], ms["INT8 ort-cpu form"]
        tail = f" {ms['ort-cpu, float']:.2f} | {ms['ort-cpu, conv-integer']:.2f} |" if extra else ""
        print(f"| {label} | {batch_size} | {fp32:.2f} | {trt:.2f} | {cpu:.2f} | {fp32 / cpu:.2f}x | {fp32 / trt:.2f}x |" + tail)
    print("\n| model | max abs diff, tensorrt vs ort-cpu form (64 inputs) | max abs logit | top-1 agreement of the forms |")
    print("|---|---|---|---|")
    for label, diff, scale, agree in diffs:
        print(f"| {label} | {diff:.3g} | {scale:.3g} | {agree:.1f}% |")
    print("\nONNX Runtime integer kernels after graph optimization:")
    for label, per_form in kernels:
        for form, ops in per_form.items():
            print(f"- {label}, {form}: " + (", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) or "none (float kernels)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
