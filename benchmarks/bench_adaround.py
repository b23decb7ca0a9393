"""AdaRound's cost on EfficientNet-Lite1 (issue 19): seconds per layer, split into the
calibration passes that cache a layer's inputs and targets ("capture") and the
rounding optimization ("optimize"), the AdaRound total and the per-layer median.

The model: EfficientNet-Lite1 (``examples/efficientnet_lite.py``), BatchNorm folded
(``bn-fold``) unless ``--no-bn-fold``, every Conv and Linear INT8 (per-channel
weights, per-tensor activations), ranges from the ``--calibrator`` on ``photos:calib``,
then the ``adaround`` refiner alone, as the pipeline runs it. ``--layers K`` keeps
only the first K quantized layers' weights quantized (the others stay FP32), to
time a few layers on a CPU; the per-layer work of those K is the full run's.

``--compare-eager`` (CUDA) runs AdaRound twice from the same model, with and without
the CUDA-graph replay of the optimization, and prints the share of weight codes
that differ and the two totals.

Examples:
    .venv/bin/python benchmarks/bench_adaround.py --threads 2 --layers 4 --calib-samples 64
    # on a GPU machine (repo root as cwd, .whl carried), from the mirror of benchmarks/gpu_setup.sh:
    source benchmarks/gpu_setup.sh; cp -r benchmarks examples /tmp/ql/; cd /tmp/ql
    python3 benchmarks/bench_adaround.py --device cuda --compare-eager --per-layer
    # or, with the CUDA tests first: bash benchmarks/gpu_adaround.sh
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import _common as C  # noqa: E402


def quantized_model(fp32: torch.nn.Module, calib: List[torch.Tensor], calibrator: str, bn_fold: bool,
                    layers: int) -> torch.nn.Module:
    """The model quantized with ``calibrator``'s ranges applied; only the first ``layers`` weights quantized (0: all)."""
    from quantlab.algorithms._layers import quantized_layers
    from quantlab.config import int8_config
    from quantlab.ptq import run_ptq

    model = copy.deepcopy(fp32)
    config = int8_config(per_channel_weights=True).replace(algorithms=("bn-fold",) if bn_fold else ())
    run_ptq(model, calib, [calibrator], config=config)
    if layers:
        for layer in quantized_layers(model)[layers:]:
            layer.weight_quantizer.off()  # kept FP32: AdaRound skips it
    return model


def run_adaround(model: torch.nn.Module, calib: List[torch.Tensor], params: Dict[str, Any],
                 device: torch.device, profile: bool) -> Dict[str, Any]:
    from quantlab.algorithms import AlgorithmContext, get_algorithm
    from quantlab.batching import forward_loop

    context = AlgorithmContext(forward_loop=forward_loop(calib), params=params)
    profiler = cProfile.Profile() if profile else None
    C.sync(device)
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    details = get_algorithm("adaround").run(model, context)
    if profiler:
        profiler.disable()
    C.sync(device)
    details = dict(details, wall_s=time.perf_counter() - start)
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(35)
        details["profile"] = out.getvalue()
    return details


def codes_of(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every quantized layer's integer weight codes (its weight on its quantizer's grid)."""
    from quantlab.algorithms._layers import quantized_layers
    from quantlab.functional import scale_from_amax

    out = {}
    for layer in quantized_layers(model):
        quantizer = layer.weight_quantizer
        scale = scale_from_amax(quantizer.amax, quantizer.spec)
        if quantizer.spec.axis is not None and scale.dim() > 0:
            shape = [1] * layer.weight.dim()
            shape[quantizer.spec.axis] = -1
            scale = scale.reshape(shape)
        out[layer.name] = torch.round(layer.weight.detach().float() * torch.reciprocal(scale)).cpu()
    return out


def layer_table(details: Dict[str, Any]) -> str:
    rows = [[r["layer"], r["samples"], f"{r.get('capture_seconds', float('nan')):.3f}",
             f"{r.get('optimize_seconds', float('nan')):.3f}", f"{r['seconds']:.3f}", r.get("optimizer", "-"), r["kept"]]
            for r in details["layers"]]
    return C.markdown_table(["layer", "samples", "capture s", "optimize s", "total s", "optimization", "kept"], rows)


def summary(details: Dict[str, Any]) -> str:
    layers = details["layers"]
    seconds = [r["seconds"] for r in layers]
    parts = [f"AdaRound total {details['wall_s']:.2f} s for {len(layers)} layers",
             f"per-layer median {statistics.median(seconds):.3f} s" if seconds else "no layer"]
    for key in ("capture_seconds", "optimize_seconds"):
        values = [r[key] for r in layers if key in r]
        if values:
            parts.append(f"{key.replace('_seconds', '')} {sum(values):.2f} s (median {statistics.median(values):.3f})")
    modes = sorted({r.get("optimizer", "-") for r in layers})
    parts.append(f"optimization: {', '.join(modes)}")
    if "passes" in details:
        parts.append(f"calibration passes: {details['passes']}")
    return "; ".join(parts)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    parser.add_argument("--calibrator", default="max")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=0, help="only the first K quantized layers (0: all)")
    parser.add_argument("--iterations", type=int, default=None, help="AdaRound iterations per layer (default: its own)")
    parser.add_argument("--no-bn-fold", action="store_true")
    parser.add_argument("--compare-eager", action="store_true",
                        help="also run with cuda_graphs=False and compare the weight codes")
    parser.add_argument("--profile", action="store_true", help="cProfile the AdaRound run (top 35 by cumulative time)")
    parser.add_argument("--per-layer", action="store_true", help="print the per-layer table")
    args = parser.parse_args(argv)
    device = C.setup_torch(args)

    from examples.efficientnet_lite import build
    from quantlab.data.photos import PhotoCrops

    torch.manual_seed(0)
    t0 = time.perf_counter()
    fp32 = build().to(device)
    samples = [PhotoCrops("calib")[i] for i in range(args.calib_samples)]
    calib = [torch.stack(samples[i:i + args.batch_size]).to(device) for i in range(0, len(samples), args.batch_size)]
    t1 = time.perf_counter()
    model = quantized_model(fp32, calib, args.calibrator, not args.no_bn_fold, args.layers)
    t2 = time.perf_counter()
    params: Dict[str, Any] = {} if args.iterations is None else {"iterations": args.iterations}
    runs = [("default", params)]
    if args.compare_eager:
        runs.append(("eager", dict(params, cuda_graphs=False)))
    header = C.machine_header("AdaRound cost on EfficientNet-Lite1", {"calib crops": args.calib_samples,
                                                                     "calibrator": args.calibrator,
                                                                     "layers": args.layers or "all"})
    print(header)
    print(f"data + model {t1 - t0:.1f} s; quantize + statistics + {args.calibrator} {t2 - t1:.1f} s", flush=True)
    codes = {}
    for name, run_params in runs:
        refined = copy.deepcopy(model) if len(runs) > 1 else model
        details = run_adaround(refined, calib, run_params, device, args.profile)
        codes[name] = codes_of(refined)
        print(f"\n{name} ({run_params or 'defaults'}): {summary(details)}", flush=True)
        if args.per_layer:
            print(layer_table(details))
        if args.profile:
            print(details["profile"])
    if len(codes) == 2:
        total = sum(c.numel() for c in codes["default"].values())
        differ = sum(int((codes["default"][k] != codes["eager"][k]).sum()) for k in codes["default"])
        worst = max(float((codes["default"][k] != codes["eager"][k]).float().mean()) for k in codes["default"])
        print(f"\ngraphed vs eager: {differ} of {total} weight codes differ ({100.0 * differ / max(1, total):.4f}%; "
              f"worst layer {100.0 * worst:.3f}%)")


if __name__ == "__main__":
    main()
