"""ONNX Runtime on the CPU: FP32 vs each INT8 form of the ort-cpu export, side by side.

The ort-cpu export has three integer forms (quantlab.runtimes.onnxruntime.forms): u8s8 (fastest
with VNNI; saturates, so wrong, on x86 CPUs without VNNI), u8u8 (weights + 128, exact on
every x86 CPU) and qdq-float (float kernels). This script prints this CPU's probe, the
form ``--ort-int8 auto`` picks here, and the median latency of FP32, every form this
CPU computes exactly (u8s8 only where exact), and the TensorRT form (its Q/DQ computed
in float), at batch 1 and 64, 2 intra-op threads, timed in interleaved rounds so load
changes on a shared machine hit every column alike. Models: the Fashion-MNIST demo CNN
(trained, cached) and ResNet-18's layout at 112x112 (torch.nn, random weights).

    .venv/bin/python benchmarks/bench_ort_int8.py [--threads 2] [--rounds 5] [--quick]

Also prints the max |difference| of each INT8 form against the TensorRT form and u8u8
against u8s8 (0 wherever both are exact).
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
from quantlab.runtimes.onnxruntime.runner import OnnxRuntimeRunner, quantized_kernels


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
    """The SIMD flags that pick ONNX Runtime's integer kernels, as in RESULTS.md."""
    from quantlab.runtimes.onnxruntime.forms import read_cpu_info

    return ", ".join(read_cpu_info().flags) or "none read"


FORMS = ("u8s8", "u8u8", "qdq-float")


def main() -> int:
    import onnxruntime as ort

    from quantlab.runtimes.onnxruntime.forms import cached_probe, choose_form

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="demo CNN only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probe = cached_probe()
    chosen = choose_form(probe)
    exact_forms = [f for f in FORMS if probe.exact(f)]
    columns = ["FP32"] + [f"ort-cpu {f}" for f in exact_forms] + ["tensorrt form"]
    rows, diffs, kernels = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_ort_int8_") as tmp:
        for label, fp32_model, calib, test in models(args.quick):
            quantized = copy.deepcopy(fp32_model)
            batches = [calib[i : i + 32] for i in range(0, len(calib), 32)]
            ql.quantize(quantized, ql.int8_config("percentile"), forward_loop=lambda m: [m(b) for b in batches])
            stem = Path(tmp) / str(len(rows))
            paths = {"FP32": export_float(fp32_model, f"{stem}.fp32.onnx", test[:2]).path}
            for form in exact_forms:
                paths[f"ort-cpu {form}"] = export_int8(quantized, f"{stem}.{form}.onnx", test[:2], target="ort-cpu", ort_int8=form).path
            paths["tensorrt form"] = export_int8(quantized, f"{stem}.trt.onnx", test[:2]).path
            runners = {name: OnnxRuntimeRunner(p, threads=args.threads) for name, p in paths.items()}
            outputs = {name: r.run(test.numpy())[0] for name, r in runners.items()}
            reference = outputs["tensorrt form"]
            diffs.append((label, float(np.abs(outputs["FP32"]).max()),
                          {name: (float(np.abs(out - reference).max()), float(np.mean(out.argmax(1) == reference.argmax(1)) * 100))
                           for name, out in outputs.items() if name.startswith("ort-cpu")},
                          float(np.abs(outputs["ort-cpu u8u8"] - outputs["ort-cpu u8s8"]).max()) if "ort-cpu u8s8" in outputs else None))
            kernels.append((label, {n: quantized_kernels(p) for n, p in paths.items() if n != "FP32"}))
            for batch_size, iters in ((1, 20), (64, 3)):
                batch = test[:batch_size].numpy()
                rows.append((label, batch_size, time_interleaved(runners, batch, args.rounds, iters)))
            for r in runners.values():
                r.close()
    print(f"\nONNX Runtime {ort.__version__} CPUExecutionProvider, {args.threads} intra-op threads; torch {torch.__version__}; "
          f"{cpu_model()} ({os.cpu_count()} logical CPUs; {cpu_flags()}); Python {platform.python_version()}")
    print(f"probe: {probe.describe()}")
    print(f"--ort-int8 auto picks: {chosen}; forms not exact here (not timed): "
          f"{', '.join(f for f in FORMS if f not in exact_forms) or 'none'}")
    print(f"median latency (ms), {args.rounds} interleaved rounds; load average at end {os.getloadavg()[0]:.1f}\n")
    int8 = [c for c in columns if c != "FP32"]
    print("| model | batch | " + " | ".join(columns) + " | " + " | ".join(f"{c} vs FP32" for c in int8) + " |")
    print("|---|---|" + "---:|" * (len(columns) + len(int8)))
    for label, batch_size, ms in rows:
        fp32 = ms["FP32"]
        print(f"| {label} | {batch_size} | " + " | ".join(f"{ms[c]:.2f}" for c in columns) + " | "
              + " | ".join(f"{fp32 / ms[c]:.2f}x" for c in int8) + " |")
    print("\n| model | max abs logit | form | max abs diff vs tensorrt form (64 inputs) | top-1 agreement |")
    print("|---|---|---|---|---|")
    for label, scale, per_form, same in diffs:
        for name, (diff, agree) in per_form.items():
            print(f"| {label} | {scale:.3g} | {name} | {diff:.3g} | {agree:.1f}% |")
        if same is not None:
            print(f"| {label} | {scale:.3g} | u8u8 vs u8s8 | {same:.3g} | |")
    print("\nONNX Runtime integer kernels after graph optimization:")
    for label, per_form in kernels:
        for form, ops in per_form.items():
            print(f"- {label}, {form}: " + (", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) or "none (float kernels)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
