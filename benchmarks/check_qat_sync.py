"""Lists host-device synchronizations inside one QAT training step (CUDA).

    python benchmarks/check_qat_sync.py

A synchronization per layer serializes the host and the GPU: the step then
costs host time plus GPU time instead of the larger of the two.
"""
from __future__ import annotations

import copy
import sys
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_qat import ResNet18, make_step  # noqa: E402
from quantlab import qat  # noqa: E402


def main() -> None:
    device = torch.device("cuda")
    from quantlab.functional import _PerChannelFakeQuantize

    w = (torch.randn(256, 128, 3, 3, device=device) * 3).requires_grad_()
    scale = torch.rand(256, device=device) * 0.05 + 1e-3
    native = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(256, dtype=torch.int32, device=device), 0, -127, 127)
    ours = _PerChannelFakeQuantize.apply(w, scale, 0, -127, 127)
    (g_native,) = torch.autograd.grad(native.sum(), w)
    (g_ours,) = torch.autograd.grad(ours.sum(), w)
    print("sync-free per-channel fake quant vs native op on CUDA: values",
          "identical" if torch.equal(native, ours) else "DIFFERENT", "/ gradients",
          "identical" if torch.equal(g_native, g_ours) else "DIFFERENT")
    x = torch.randn(32, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (32,), device=device)
    for name, model in {"fp32": ResNet18().to(device),
                        "qat": qat.prepare(ResNet18().to(device), data=[(x[:8], None)], calibrator="max"),
                        "qat-lsq": qat.prepare(ResNet18().to(device), data=[(x[:8], None)], calibrator="max", learn_amax=True)}.items():
        step = make_step(model, x, y)
        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        print(f"{name}: {len(syncs)} synchronizing call(s) in one step")
        for w in syncs[:3]:
            print("   ", str(w.message)[:100], f"({w.filename}:{w.lineno})")


if __name__ == "__main__":
    main()
