"""EfficientNet-Lite1 INT8 on natural-photo crops: what each PTQ algorithm buys, per calibrator.

Every Conv and Linear INT8 (per-channel weights, per-tensor activations, as
TensorRT runs them), calibrated on ``photos:calib`` and scored on
``photos:eval`` (disjoint photos) as top-1 agreement with FP32 and the KL
divergence of the logits. One row per (algorithm set, calibrator), from one
statistics pass per algorithm set; the stages are timed (transforms,
statistics pass, choosing + refining + applying each calibrator, evaluation).

Algorithm sets are separated by ``;``, algorithms inside a set by ``,`` (any
name :func:`quantlab.algorithms.list_algorithms` knows, e.g. ``bias-correction``,
``adaround`` once they exist). With ``--modelopt`` the same modules are quantized
by NVIDIA Model Optimizer (``Conv2dStaticSamePadding`` registered as a
``QuantConv2d``; without that registration Model Optimizer quantizes only the
classifier) with its max and histogram calibrators.

Examples:
    nice -n 5 .venv/bin/python benchmarks/bench_efficientnet_lite.py --threads 2 --eval-samples 128 --calib-samples 64
    .venv/bin/python benchmarks/bench_efficientnet_lite.py --threads 2 --algorithms "none;bn-fold;cle" --modelopt \\
        --append benchmarks/RESULTS.md
    python benchmarks/bench_efficientnet_lite.py --device cuda --algorithms "none;cle;cle,bias-correction,adaround"
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import _common as C  # noqa: E402

CALIBRATORS = ("max", "percentile", "entropy", "mse")


def batches(dataset: Any, count: int, batch_size: int, device: torch.device) -> List[torch.Tensor]:
    """The first ``count`` samples as device batches (cut once, reused by every row)."""
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    return [torch.stack(samples[i : i + batch_size]).to(device) for i in range(0, len(samples), batch_size)]


@torch.no_grad()
def logits_of(model: torch.nn.Module, data: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model(x).float().cpu() for x in data])


def score(logits: torch.Tensor, reference: torch.Tensor) -> Dict[str, float]:
    """Top-1 agreement (percent) and mean KL(FP32 || INT8) of the softmax (nats)."""
    ref = torch.log_softmax(reference.double(), 1)
    out = torch.log_softmax(logits.double(), 1)
    return {"agreement": 100.0 * float((logits.argmax(1) == reference.argmax(1)).double().mean()),
            "kl": float((ref.exp() * (ref - out)).sum(1).mean())}


def parse_sets(text: str) -> List[Dict[str, Dict[str, Any]]]:
    """``"none;cle;cle:balance=activations+alpha=0.5,bias-correction"`` -> per set, name -> parameters."""
    sets = []
    for chunk in text.split(";"):
        found: Dict[str, Dict[str, Any]] = {}
        for item in (i.strip() for i in chunk.split(",")):
            if not item or item == "none":
                continue
            name, _, rest = item.partition(":")
            params: Dict[str, Any] = {}
            for kv in filter(None, rest.split("+")):
                key, _, value = kv.partition("=")
                if value in ("true", "false"):
                    params[key] = value == "true"
                    continue
                try:
                    params[key] = int(value) if value.lstrip("-").isdigit() else float(value)
                except ValueError:
                    params[key] = value
            found[name] = params
        sets.append(found)
    return sets


def label(algorithms: Dict[str, Dict[str, Any]]) -> str:
    return ",".join(name + "".join(f" {k}={v}" for k, v in p.items()) for name, p in algorithms.items()) or "none"


def run_quantlab(fp32: torch.nn.Module, algorithms: Dict[str, Dict[str, Any]], calibrators: Sequence[str],
                 calib: Sequence[torch.Tensor], evaluation: Sequence[torch.Tensor], reference: torch.Tensor,
                 per_channel_weights: bool = True) -> List[Dict[str, Any]]:
    from quantlab.config import int8_config
    from quantlab.pipeline.apply import apply_scales
    from quantlab.pipeline.refine import restore_refinable_state
    from quantlab.ptq import run_ptq

    model = copy.deepcopy(fp32)
    config = int8_config(per_channel_weights=per_channel_weights).replace(algorithms=tuple(algorithms), algorithm_params={k: v for k, v in algorithms.items() if v})
    start = time.perf_counter()
    result = run_ptq(model, calib, list(calibrators), config=config)
    total = time.perf_counter() - start
    transform_s = sum(r.seconds for r in result.transforms)
    rows = []
    for name in calibrators:
        if name in result.refined_weights:
            restore_refinable_state(model, result.refined_weights[name])
        apply_scales(model, result.scales[name])
        t0 = time.perf_counter()
        metrics = score(logits_of(model, evaluation), reference)
        refine_s = sum(r.seconds for r in result.refinements.get(name, []))
        rows.append({"tool": "quantlab", "algorithms": label(algorithms), "calibrator": name, **metrics,
                     "transform_s": transform_s, "statistics_s": result.statistics_seconds,
                     "refine_s": refine_s, "calibrate_s": result.calibrate_seconds[name], "ptq_total_s": total,
                     "eval_s": time.perf_counter() - t0,
                     "details": {r.name: _summary(r.details) for r in result.transforms}})
    return rows


def _summary(details: Dict[str, Any]) -> str:
    if "pairs" in details:
        clips = details.get("clips", [])
        return (f"{len(details['pairs'])} pairs, {details.get('sweeps')} sweeps, {len(clips)} ReLU6 made per-channel, "
                f"{len(details.get('skipped', []))} skipped")
    if "folded" in details:
        return f"{len(details['folded'])} BatchNorms folded, {len(details['not_folded'])} not"
    if "shifted" in details:
        return f"{len(details['shifted'])} of {details.get('layers')} inputs shifted"
    return ""


def run_modelopt(fp32: torch.nn.Module, calibrators: Sequence[str], calib: Sequence[torch.Tensor],
                 evaluation: Sequence[torch.Tensor], reference: torch.Tensor) -> List[Dict[str, Any]]:
    """Model Optimizer INT8_DEFAULT_CFG (per-channel weights, per-tensor activations), the Conv2d subclass registered.

    ``max``: ``mtq.quantize`` with its max calibrator. ``entropy``/``percentile``/``mse``: input
    quantizers with ``calibrator="histogram"``, one statistics pass, then ``load_calib_amax(method)``.
    """
    with C.quiet_warnings():
        import modelopt.torch.quantization as mtq
        from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding
        from modelopt.torch.quantization.calib import HistogramCalibrator
        from modelopt.torch.quantization.model_calib import enable_stats_collection
        from modelopt.torch.quantization.nn import QuantModuleRegistry, TensorQuantizer
        from modelopt.torch.quantization.nn.modules.quant_conv import _QuantConv2d

    if QuantModuleRegistry.get(Conv2dStaticSamePadding) is None:
        mtq.register(original_cls=Conv2dStaticSamePadding, quantized_cls=_QuantConv2d)

    def loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for x in calib:
                m(x)

    def config(histogram: bool) -> Dict[str, Any]:
        cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
        if histogram:
            for entry in cfg["quant_cfg"]:
                if entry.get("quantizer_name") == "*input_quantizer" and "cfg" in entry:
                    entry["cfg"] = dict(entry["cfg"], calibrator="histogram")
            cfg["algorithm"] = None
        return cfg

    def quantized_layers(model: torch.nn.Module) -> int:
        return sum(1 for m in model.modules() if isinstance(getattr(m, "weight_quantizer", None), TensorQuantizer)
                   and not m.weight_quantizer._disabled)

    rows = []
    if "max" in calibrators:
        model = copy.deepcopy(fp32)
        start = time.perf_counter()
        with C.quiet_warnings():
            mtq.quantize(model, config(False), loop)
        ptq_s = time.perf_counter() - start
        t0 = time.perf_counter()
        metrics = score(logits_of(model, evaluation), reference)
        rows.append({"tool": "modelopt", "algorithms": "none", "calibrator": "max", **metrics, "transform_s": 0.0,
                     "statistics_s": float("nan"), "refine_s": 0.0, "calibrate_s": float("nan"), "ptq_total_s": ptq_s,
                     "eval_s": time.perf_counter() - t0, "details": {"modelopt": f"{quantized_layers(model)} layers quantized"}})
    methods = [c for c in calibrators if c in ("entropy", "percentile", "mse")]
    if not methods:
        return rows
    model = copy.deepcopy(fp32)
    with C.quiet_warnings():
        mtq.quantize(model, config(True), None)
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer) and not m._disabled]
    hist = [q for q in quantizers if isinstance(getattr(q, "_calibrator", None), HistogramCalibrator)]
    start = time.perf_counter()
    with C.quiet_warnings():
        enable_stats_collection(model)
        loop(model)
        for q in quantizers:
            if q not in hist and getattr(q, "_calibrator", None) is not None:
                q.load_calib_amax()
    stats_s = time.perf_counter() - start
    for method in methods:
        kwargs = {"percentile": 99.99} if method == "percentile" else {}
        t0 = time.perf_counter()
        with C.quiet_warnings():
            for q in hist:
                q.load_calib_amax(method, **kwargs)
        calibrate_s = time.perf_counter() - t0
        for q in quantizers:
            q.enable_quant()
            q.disable_calib()
        t0 = time.perf_counter()
        metrics = score(logits_of(model, evaluation), reference)
        rows.append({"tool": "modelopt", "algorithms": "none", "calibrator": method, **metrics, "transform_s": 0.0,
                     "statistics_s": stats_s, "refine_s": 0.0, "calibrate_s": calibrate_s,
                     "ptq_total_s": stats_s + calibrate_s, "eval_s": time.perf_counter() - t0,
                     "details": {"modelopt": f"{quantized_layers(model)} layers quantized; percentile 99.99" if method == "percentile"
                                 else f"{quantized_layers(model)} layers quantized"}})
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    parser.add_argument("--algorithms", default="none;bn-fold;cle",
                        help="';'-separated algorithm sets, each ','-separated, parameters after ':' joined by '+' "
                             "(e.g. 'none;cle;cle:balance=activations,bias-correction')")
    parser.add_argument("--calibrators", default=",".join(CALIBRATORS))
    parser.add_argument("--eval-samples", type=int, default=640)
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--modelopt", action="store_true", help="also run NVIDIA Model Optimizer")
    parser.add_argument("--tools", default="quantlab", help="comma list of quantlab, modelopt (default quantlab)")
    parser.add_argument("--weights", choices=("per-channel", "per-tensor"), default="per-channel",
                        help="quantlab weight scales (per-tensor: the case DFQ's weight equalization is made for)")
    args = parser.parse_args(argv)
    device = C.setup_torch(args)

    from examples.efficientnet_lite import build
    from quantlab.algorithms import parse_algorithms
    from quantlab.data.photos import PhotoCrops, describe

    sets = parse_sets(args.algorithms)
    for s in sets:
        parse_algorithms(list(s))  # unknown names fail before any work
    calibrators = [c.strip() for c in args.calibrators.split(",") if c.strip()]

    t0 = time.perf_counter()
    fp32 = build().to(device)
    calib = batches(PhotoCrops("calib"), args.calib_samples, args.batch_size, device)
    evaluation = batches(PhotoCrops("eval"), args.eval_samples, args.batch_size, device)
    data_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = logits_of(fp32, evaluation)
    fp32_eval_s = time.perf_counter() - t0
    rows: List[Dict[str, Any]] = []
    for algorithms in sets if "quantlab" in args.tools.split(",") else []:
        rows += run_quantlab(fp32, algorithms, calibrators, calib, evaluation, reference, args.weights == "per-channel")
        print(rows[-len(calibrators):], file=sys.stderr, flush=True)
    modelopt_note = "Model Optimizer: not run (pass --modelopt)"
    if args.modelopt or "modelopt" in args.tools.split(","):
        try:
            rows += run_modelopt(fp32, calibrators, calib, evaluation, reference)
            modelopt_note = "Model Optimizer: Conv2dStaticSamePadding registered as QuantConv2d, INT8_DEFAULT_CFG"
        except Exception as exc:  # noqa: BLE001 - a peer's failure is reported, not fatal
            modelopt_note = f"Model Optimizer: not measured ({type(exc).__name__}: {exc})"

    n_eval = sum(len(x) for x in evaluation)
    n_calib = sum(len(x) for x in calib)
    header = C.machine_header(
        "EfficientNet-Lite1 INT8 on natural-photo crops: algorithms x calibrators",
        {"eval crops": n_eval, "calib crops": n_calib, "photos": describe(),
         "efficientnet-lite-pytorch": C.package_version("efficientnet-lite-pytorch"),
         "scikit-image": C.package_version("scikit-image")})
    table = C.markdown_table(
        ["tool", "algorithms", "calibrator", "top-1 agreement %", "logit KL (nats)", "transforms s", "statistics s",
         "refine s", "calibrate s", "PTQ total s", f"eval s ({n_eval})", "notes"],
        [[r["tool"], r["algorithms"], r["calibrator"], f"{r['agreement']:.2f}", f"{r['kl']:.4f}", f"{r['transform_s']:.2f}",
          f"{r['statistics_s']:.1f}", f"{r['refine_s']:.1f}", f"{r['calibrate_s']:.1f}", f"{r['ptq_total_s']:.1f}",
          f"{r['eval_s']:.1f}", "; ".join(v for v in r["details"].values() if v)] for r in rows])
    notes = (f"Every Conv and Linear INT8 ({args.weights} weights in quantlab's rows, per-tensor activations). FP32 eval {fp32_eval_s:.1f} s, "
             f"data {data_s:.1f} s. One agreement point = {100.0 / n_eval:.2f}% of the crops. {modelopt_note}.")
    C.emit(header + "\n" + table + "\n\n" + notes + "\n", args.append)


if __name__ == "__main__":
    main()
