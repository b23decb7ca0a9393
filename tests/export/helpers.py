"""Shared helpers of the export tests: logits from PyTorch and from ONNX Runtime."""
import numpy as np
import torch


def torch_logits(model, images, batch=500):
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)]).numpy()


def ort_logits(path, images, batch=500, threads=2):
    from quantlab.runtimes.onnxruntime.runner import OnnxRuntimeRunner

    with OnnxRuntimeRunner(path, threads=threads) as runner:
        return np.concatenate([runner.run(images[i : i + batch].numpy())[0] for i in range(0, len(images), batch)])
