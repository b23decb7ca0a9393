"""QAT step overhead vs FP32 training: quantlab.qat vs NVIDIA Model Optimizer, same model and batches.

Each variant runs in its own process (clean peak memory): a training step is
forward + loss + backward + SGD step on one batch. The step time is the median
over ``--steps`` steps after ``--warmup`` steps (CUDA-synchronized on the GPU).

* FP32: the model as built.
* quantlab QAT: ``qat.prepare(model, data=calibration batches)`` (entropy ranges,
  weight ranges recomputed every step); ``--learn-amax`` adds the LSQ variant.
* Model Optimizer QAT: ``mtq.quantize(model, INT8_DEFAULT_CFG, forward_loop)``
  (max calibration) then the same loop, as its QAT guide does.

The one-off preparation time (statistics pass and calibration) is reported
beside the step time.

Examples:
    .venv/bin/python benchmarks/bench_qat_vs_modelopt.py --models fmnist --batch-size 128
    python benchmarks/bench_qat_vs_modelopt.py --device cuda --models fmnist,resnet50,bert-base --batch-size 64
"""
from __future__ import annotations

import argparse
import copy
import statistics as st
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common as C  # noqa: E402
from _models import MODELS, call, make_workload  # noqa: E402

VARIANTS = ("fp32", "quantlab", "quantlab-lsq", "modelopt")


def _loss(output: Any, batch_index: int) -> torch.Tensor:
    out = output if isinstance(output, torch.Tensor) else output[0]
    if out.dim() == 2:  # classifier logits: cross-entropy on fixed pseudo-labels
        g = torch.Generator(device=out.device).manual_seed(batch_index)
        labels = torch.randint(0, out.shape[1], (out.shape[0],), generator=g, device=out.device)
        return nn.functional.cross_entropy(out.float(), labels)
    return out.float().pow(2).mean()  # encoder: any scalar of the hidden states


def worker(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    train = make_workload(args.model, args.batch_size * (args.steps + args.warmup), args.batch_size)
    calib = make_workload(args.model, args.calib_samples, args.batch_size)
    model = train.build().to(device)
    prepare_seconds = 0.0
    if args.variant.startswith("quantlab"):
        from quantlab import qat

        prepare_seconds, _ = C.timed(lambda: qat.prepare(model, data=calib.batches(device),
                                                         learn_amax=args.variant == "quantlab-lsq"), device)
    elif args.variant == "modelopt":
        with C.quiet_warnings():
            import modelopt.torch.quantization as mtq
            from modelopt.torch.quantization import extensions

            if device.type == "cuda" and not args.modelopt_cuda_ext:
                extensions.get_cuda_ext.extension = None  # its PyTorch fake-quant fallback (no JIT build)

            def loop(m: nn.Module) -> None:
                with torch.no_grad():
                    for b in calib.batches(device):
                        call(m, b)

            prepare_seconds, _ = C.timed(lambda: mtq.quantize(model, copy.deepcopy(mtq.INT8_DEFAULT_CFG), loop), device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    times: List[float] = []
    with C.quiet_warnings(), C.PeakMemory(device=device) as mem:
        for i, batch in enumerate(train.batches(device)):
            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                loss = _loss(call(model, batch), i)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"non-finite loss at step {i}")
                loss.backward()
                optimizer.step()

            seconds, _ = C.timed(step, device)
            if i >= args.warmup:
                times.append(seconds)
    return {"variant": args.variant, "step_seconds": st.median(times), "prepare_seconds": prepare_seconds,
            "steps": len(times), "host_peak": mem.host_peak, "device_peak": mem.device_peak,
            "process_maxrss": C.max_rss_bytes()}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--models", default="fmnist", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--variants", default="fp32,quantlab,modelopt", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--modelopt-cuda-ext", action="store_true",
                        help="use Model Optimizer's JIT-built CUDA fake-quant kernels (first use compiles them)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        C.setup_torch(args)
        C.worker_result(worker(args))
        return
    device = C.setup_torch(args)
    sections = [C.machine_header("QAT step overhead: quantlab vs Model Optimizer", {
        "device": str(device), "batch size": args.batch_size, "timed steps": args.steps})]
    if device.type == "cpu":
        sections.append(C.CPU_NOISE_NOTE + "\n")
    rows = []
    for model_name in args.models.split(","):
        base: Optional[float] = None
        for variant in args.variants.split(","):
            cmd = ["--variant", variant, "--model", model_name, "--device", args.device, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--calib-samples", str(args.calib_samples)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.modelopt_cuda_ext:
                cmd += ["--modelopt-cuda-ext"]
            print(f"[{model_name}] {variant} ...", file=sys.stderr, flush=True)
            r = C.run_worker(Path(__file__).resolve(), cmd, timeout=args.timeout)
            if "error" in r:
                rows.append([model_name, variant, None, None, None, None, None, r["error"][-200:].replace("\n", " ").replace("|", "/")])
                continue
            if variant == "fp32":
                base = r["step_seconds"]
            ratio = None if base is None else r["step_seconds"] / base
            rows.append([model_name, variant, r["step_seconds"] * 1e3, ratio, r["prepare_seconds"],
                         C.mib(r["process_maxrss"]), C.mib(r["device_peak"]), ""])
    sections.append(C.markdown_table(["model", "variant", "median step ms", "x FP32 step", "prepare s",
                                      "process peak RSS MiB", "device peak MiB", "notes"], rows))
    C.emit("\n".join(sections), args.append)


if __name__ == "__main__":
    main()
