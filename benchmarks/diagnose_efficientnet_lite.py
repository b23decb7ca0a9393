"""Where EfficientNet-Lite1's remaining INT8 loss lives, and how fragile the crops are.

After bn-fold + AdaRound + bias correction (max calibrator), scores top-1 agreement with
FP32 on ``photos:eval`` for: the whole INT8 model; weights only (every input quantizer
off); activations only (BN folded, FP weights, every input INT8); each layer's input
quantizer turned off alone (the per-layer gain); and the noise floors of the metric
(FP16; FP32 with uniform noise of one input step added to the image; FP32 with only the
image rounded to the stem's INT8 grid). Then experiments on the activation ranges, each followed by the same AdaRound + bias correction:
``local``: each input's amax chosen from multiples of its max by the mean squared error of
its own layer's output (FP32 input and weights as reference, quantized weights in the loop);
``greedy``: in network order, each input's multiple chosen by the KL of the final logits
on calibration crops; ``block`` (``block1000``: 1,000 iterations): instead of the pipeline's
layer-wise AdaRound, the rounding of each MBConv block's convs learned together against the
FP32 block's output (BRECQ's unit), then bias correction; ``diversity``: the algorithms calibrated
on the standard crops vs on crops that include half of the evaluation photos, both scored on the
other half; ``pixels``: crops with whole pixel values and the stem's input grid pinned to the
pixel grid (input quantization exact); ``bits9``: every activation on a 9-bit grid (what
asymmetric UINT8 gives non-negative activations; not a TensorRT type); ``shift``: the
non-negative inputs moved by half their range so the symmetric grid covers them (a fold in
a TensorRT graph, simulated here).

Examples (results: benchmarks/RESULTS.md):
    python benchmarks/diagnose_efficientnet_lite.py --device cuda --per-layer --experiments local,greedy,block
    python benchmarks/diagnose_efficientnet_lite.py --threads 2 --floors-only
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import _common as C  # noqa: E402
from bench_efficientnet_lite import batches, logits_of, score  # noqa: E402

class _Stop(Exception):
    """Ends a forward at the hooked layer."""


MULTIPLES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4)


def input_quantizers(model: torch.nn.Module) -> List[Any]:
    from quantlab.attach import iter_quantizers
    from quantlab.tensor_quantizer import Role

    return [ref for ref in iter_quantizers(model) if ref.role is Role.INPUT]


def prepared(fp32: torch.nn.Module, algorithms: Sequence[str], calib: Sequence[torch.Tensor],
             input_bits: int = 8) -> Any:
    """A copy of ``fp32`` transformed (the config's transforms), quantizers attached, max ranges chosen.

    ``input_bits`` other than 8 is for the ``bits9`` experiment only: the config refuses
    more than 8 bits (TensorRT has no such type), so the spec is changed past its check.
    """
    from quantlab.batching import forward_loop
    from quantlab.config import QuantizerSpec, int8_config
    from quantlab.pipeline.choose import choose_all
    from quantlab.pipeline.collect import collect
    from quantlab.pipeline.run import prepare

    model = copy.deepcopy(fp32)
    config = int8_config().replace(algorithms=tuple(algorithms))
    if input_bits != 8:
        spec = QuantizerSpec(num_bits=8, narrow_range=config.input.narrow_range)
        object.__setattr__(spec, "num_bits", input_bits)
        object.__setattr__(config, "input", spec)
    loop = forward_loop(calib)
    prepare(model, config, loop)
    statistics = collect(model, loop)
    ranges = choose_all(statistics, {"max": {}})["max"]
    return model, config, loop, statistics, ranges


def refined(model: torch.nn.Module, config: Any, loop: Callable, statistics: Any, ranges: Any) -> Dict[str, Any]:
    """AdaRound + bias correction with ``ranges`` (the pipeline's refine -> apply)."""
    from quantlab.algorithms import Stage, parse_algorithms
    from quantlab.pipeline.run import PTQResult, apply_each

    refiners = [a for a in parse_algorithms(config.algorithms) if a.stage is Stage.REFINE]
    result = PTQResult(scales={}, num_batches=statistics.num_batches, statistics_seconds=statistics.seconds,
                       calibrate_seconds={})
    start = time.perf_counter()
    apply_each(model, statistics, {"max": ranges}, result, refiners=refiners, forward_loop=loop, config=config)
    return {"refine_s": time.perf_counter() - start}


def capture(net: torch.nn.Module, module: torch.nn.Module, calib: Sequence[torch.Tensor], samples: int,
            what: str) -> torch.Tensor:
    """The first ``samples`` of ``module``'s input (before its own quantizer) or output in ``net``,
    each forward stopped right there."""
    got: List[torch.Tensor] = []

    def hook(mod: torch.nn.Module, args: Any, output: Any = None) -> None:
        got.append((args[0] if what == "input" else output).detach().float().clone())
        raise _Stop

    handle = module.register_forward_pre_hook(hook, prepend=True) if what == "input" else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            seen = 0
            for x in calib:
                try:
                    net(x)
                except _Stop:
                    pass
                seen += x.shape[0]
                if seen >= samples:
                    break
    finally:
        handle.remove()
    return torch.cat(got)[:samples]


def local_search(model: torch.nn.Module, ranges: Any, calib: Sequence[torch.Tensor], samples: int) -> Dict[str, float]:
    """Per input: the multiple of its max amax with the least squared error of its layer's output."""
    from quantlab.attach import quantization_disabled
    from quantlab.pipeline.apply import apply

    apply(model, ranges)
    chosen: Dict[str, float] = {}
    refs = [r for r in input_quantizers(model) if r.module_name in ranges.inputs]
    for ref in refs:
        with quantization_disabled(model):
            captured = [capture(model, ref.module, calib, samples, "input")]
        best, best_err = 1.0, float("inf")
        base = ranges.inputs[ref.module_name]
        with torch.no_grad():
            with quantization_disabled(model, [ref.module_name]):
                targets = [ref.module(x) for x in captured]
            for m in MULTIPLES:
                ref.quantizer.set_amax(base * m)
                err = sum(float((ref.module(x) - y).double().pow(2).sum()) for x, y in zip(captured, targets))
                if err < best_err:
                    best, best_err = m, err
            ref.quantizer.set_amax(base)
        chosen[ref.module_name] = best
    return chosen


def greedy_search(model: torch.nn.Module, ranges: Any, calib: Sequence[torch.Tensor],
                  reference: torch.Tensor) -> Dict[str, float]:
    """In network order, each input's multiple that minimizes the KL of the final logits on ``calib``."""
    from quantlab.pipeline.apply import apply

    apply(model, ranges)
    chosen: Dict[str, float] = {}
    for ref in [r for r in input_quantizers(model) if r.module_name in ranges.inputs]:
        base = ranges.inputs[ref.module_name]
        best, best_kl = 1.0, float("inf")
        for m in MULTIPLES:
            ref.quantizer.set_amax(base * m)
            kl = score(logits_of(model, calib), reference)["kl"]
            if kl < best_kl:
                best, best_kl = m, kl
        ref.quantizer.set_amax(base * best)
        chosen[ref.module_name] = best
    return chosen


def block_reconstruction(model: torch.nn.Module, calib: Sequence[torch.Tensor], samples: int = 256,
                         iterations: int = 300, batch: int = 32) -> Dict[str, Any]:
    """BRECQ-style experiment: AdaRound's rounding learned per MBConv block (expand, depthwise and project
    convs together, the block's inner input quantizers on, straight-through) against the FP32 block's
    output; the stem, head and classifier layer by layer. Inputs from the quantized model (earlier units
    rounded), targets from a copy of the model with every quantizer off."""
    from quantlab.algorithms._layers import quantized_layers
    from quantlab.algorithms.adaround import DEFAULTS, LayerRounding, beta_at
    from quantlab.attach import quantization_disabled, weight_name
    from quantlab.functional import scale_from_amax

    params = dict(DEFAULTS, iterations=iterations, batch_size=batch)
    reference = copy.deepcopy(model)
    layers = {l.name: l for l in quantized_layers(model)}
    units = [("_conv_stem", model._conv_stem, reference._conv_stem)]
    units += [(f"_blocks.{i}", b, reference._blocks[i]) for i, b in enumerate(model._blocks)]
    units += [("_conv_head", model._conv_head, reference._conv_head), ("_fc", model._fc, reference._fc)]
    report: Dict[str, Any] = {}

    generator = torch.Generator(device="cpu").manual_seed(0)
    for name, unit, ref_unit in units:
        convs = [(n, l) for n, l in layers.items() if n == name or n.startswith(name + ".")]
        x = capture(model, unit, calib, samples, "input")
        with quantization_disabled(reference):
            y = capture(reference, ref_unit, calib, samples, "output")
        roundings = {}
        for n, l in convs:
            q = l.weight_quantizer
            roundings[n] = LayerRounding(l.weight, scale_from_amax(q.amax, q.spec), q.spec.axis, q.spec.quant_min,
                                         q.spec.quant_max, q.spec.bound).to(x.device)
        keys = {n: (n[len(name) + 1:] + "." if n != name else "") + f"parametrizations.{weight_name(l.module)}.original"
                for n, l in convs}
        modes = [(l.weight_quantizer, l.weight_quantizer.mode) for _, l in convs]
        for q, _ in modes:
            q.off()
        own_input = unit.__dict__["_modules"].get("input_quantizer")
        optimizer = torch.optim.Adam([r.v for r in roundings.values()], lr=params["lr"])

        def loss_of(weights: Dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(unit, {keys[n]: w for n, w in weights.items()}, (xb,))
            return (out.float() - yb).pow(2).sum(1).mean()

        try:
            with torch.no_grad():
                before = float(loss_of({n: r.nearest_weight() for n, r in roundings.items()}, x, y))
            for i in range(params["iterations"]):
                rows = torch.randint(0, x.shape[0], (batch,), generator=generator).to(x.device)
                rec = loss_of({n: r.soft_weight() for n, r in roundings.items()}, x[rows], y[rows])
                beta = beta_at(i, params)
                loss = rec if beta is None else rec + params["reg_weight"] * sum(r.regularizer(beta) for r in roundings.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                hard = {n: r.hard_weight() for n, r in roundings.items()}
                after = float(loss_of(hard, x, y))
                if after <= before:
                    for n, l in convs:
                        l.weight.copy_(hard[n].to(l.weight.dtype))
        finally:
            for q, mode in modes:
                q.restore(mode)
        report[name] = {"before": before, "after": after, "kept": "learned" if after <= before else "nearest",
                        "convs": len(convs), "own_input_quantized": own_input is not None}
        del x, y
    return report


def calibration_diversity(fp32: torch.nn.Module, calib: Sequence[torch.Tensor], algorithms: Sequence[str],
                          with_adaround: Callable[[Any], Any], batch_size: int, device: torch.device) -> Dict[str, Any]:
    """Does calibration data closer to the evaluation photos close the gap? The evaluation photos
    are split in two (alternate photos): the algorithms are run once on the standard calibration
    crops and once on half of them plus crops of the first half of the evaluation photos; both
    are scored on the other half (photos neither calibration set saw)."""
    from quantlab.data.photos import PhotoCrops

    crops = PhotoCrops("eval")
    seen = [i for i, box in enumerate(crops.boxes) if box[0] % 2 == 0]
    unseen = [i for i, box in enumerate(crops.boxes) if box[0] % 2 == 1]
    evaluation = batches([crops[i] for i in unseen], len(unseen), batch_size, device)
    reference = logits_of(fp32, evaluation)
    standard = torch.cat(list(calib))
    half = standard.shape[0] // 2
    mixed_samples = torch.cat([standard[:half], torch.stack([crops[i] for i in seen[:half]]).to(device)])
    # Interleaved, so every batch (and AdaRound's first max_samples) holds both kinds.
    order = torch.stack([torch.arange(half), torch.arange(half) + half], 1).flatten()
    mixed = list(mixed_samples[order.to(device)].split(batch_size))
    out: Dict[str, Any] = {"eval_crops": len(unseen), "eval_photos": sorted({crops.boxes[i][0] for i in unseen}),
                           "calibration_photos_added": sorted({crops.boxes[i][0] for i in seen[:half]})}
    for name, data in (("standard_calibration", list(calib)), ("with_evaluation_like_photos", mixed)):
        model, config, loop, statistics, ranges = prepared(fp32, algorithms, data)
        refined(model, with_adaround(config), loop, statistics, ranges)
        out[name] = score(logits_of(model, evaluation), reference)
        del model
    return out


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """A ``(p - 127) / 128`` crop with whole pixel values, as an 8-bit image pipeline hands it over."""
    return (torch.round(x * 128.0 + 127.0).clamp(0, 255) - 127.0) / 128.0


def representation_experiment(name: str, fp32: torch.nn.Module, calib: Sequence[torch.Tensor],
                              evaluation: Sequence[torch.Tensor], reference: torch.Tensor,
                              algorithms: Sequence[str], with_adaround: Callable[[Any], Any]) -> Dict[str, Any]:
    """``pixels``: crops with whole pixel values (FP32's reference on them too) and the stem's input amax
    pinned to 127/128, so its INT8 grid (step 1/128) holds every pixel exactly; ``bits9``: every
    activation on a 9-bit symmetric grid, the resolution asymmetric UINT8 (TF-Lite) gives the
    non-negative ReLU6 outputs that TensorRT's symmetric INT8 covers with 0..127."""
    out: Dict[str, Any] = {}
    if name == "pixels":
        calib = [to_pixels(x) for x in calib]
        evaluation = [to_pixels(x) for x in evaluation]
        pixel_reference = logits_of(fp32, evaluation)
        out["fp32_pixels_vs_fp32"] = score(pixel_reference, reference)
        reference = pixel_reference
    model, config, loop, statistics, ranges = prepared(fp32, algorithms, calib, input_bits=9 if name == "bits9" else 8)
    if name == "pixels":
        stem = input_quantizers(model)[0].module_name
        out["stem"] = {"layer": stem, "max_amax": ranges.inputs[stem], "pinned_amax": 127 / 128}
        ranges.inputs[stem] = 127 / 128
    out["refine_s"] = refined(model, with_adaround(config), loop, statistics, ranges)["refine_s"]
    out.update(score(logits_of(model, evaluation), reference))
    return out


def shift_experiment(fp32: torch.nn.Module, calib: Sequence[torch.Tensor], evaluation: Sequence[torch.Tensor],
                     reference: torch.Tensor, algorithms: Sequence[str],
                     with_adaround: Callable[[Any], Any]) -> Dict[str, Any]:
    """``shift``: every input that never goes below 0 on the calibration crops (ReLU6 outputs) is
    quantized as ``q(x - m/2) + m/2`` with amax ``m/2`` (``m`` its max): the whole symmetric INT8
    grid covers ``[0, m]``. In a TensorRT graph this is a fold, not an op: the producer's bias and
    clip bounds move by ``-m/2``, the consumer's bias by ``+m/2 * sum(W)`` and its zero padding
    becomes ``-m/2`` padding (on the grid: -127 steps). Simulated here in fake quantization."""
    model, config, loop, statistics, ranges = prepared(fp32, algorithms, calib)
    minima: Dict[str, float] = {}
    handles = []
    for ref in input_quantizers(model):
        def hook(module: Any, args: Any, name: str = ref.module_name) -> None:
            minima[name] = min(minima.get(name, float("inf")), float(args[0].min()))
        handles.append(ref.module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for x in calib:
            model(x)
    for h in handles:
        h.remove()
    shifted = []
    for ref in input_quantizers(model):
        if minima.get(ref.module_name, -1.0) < 0 or ref.module_name not in ranges.inputs:
            continue
        half = ranges.inputs[ref.module_name] / 2
        ranges.inputs[ref.module_name] = half
        original = ref.quantizer.forward
        ref.quantizer.forward = lambda x, f=original, s=half: f(x - s) + s
        shifted.append(ref.module_name)
    out: Dict[str, Any] = {"shifted_inputs": len(shifted), "inputs": len(input_quantizers(model))}
    out["refine_s"] = refined(model, with_adaround(config), loop, statistics, ranges)["refine_s"]
    out.update(score(logits_of(model, evaluation), reference))
    return out


def scaled(ranges: Any, multiples: Dict[str, float]) -> Any:
    out = copy.copy(ranges)
    out.inputs = {k: v * multiples.get(k, 1.0) for k, v in ranges.inputs.items()}
    return out


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    parser.add_argument("--eval-samples", type=int, default=640)
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--algorithms", default="bn-fold,adaround,bias-correction")
    parser.add_argument("--adaround", default="", help="AdaRound parameters, e.g. iterations=10+max_samples=16")
    parser.add_argument("--per-layer", action="store_true", help="score each input quantizer turned off alone")
    parser.add_argument("--experiments", default="", help="comma list of local, greedy, block[ITERATIONS], diversity, pixels, bits9, shift")
    parser.add_argument("--local-samples", type=int, default=64)
    parser.add_argument("--json", metavar="PATH", help="also write every number as JSON")
    parser.add_argument("--floors-only", action="store_true", help="only the metric's floors (FP16, input noise, INT8 image)")
    args = parser.parse_args(argv)
    device = C.setup_torch(args)

    from bench_efficientnet_lite import parse_sets
    from examples.efficientnet_lite import build
    from quantlab.attach import iter_quantizers
    from quantlab.pipeline.apply import apply as apply_ranges
    from quantlab.data.photos import PhotoCrops
    from quantlab.tensor_quantizer import Role

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    adaround_params = parse_sets("adaround:" + args.adaround.replace(",", "+"))[0]["adaround"] if args.adaround else {}
    fp32 = build().to(device)
    calib = batches(PhotoCrops("calib"), args.calib_samples, args.batch_size, device)
    evaluation = batches(PhotoCrops("eval"), args.eval_samples, args.batch_size, device)
    reference = logits_of(fp32, evaluation)
    calib_reference = logits_of(fp32, calib)
    out: Dict[str, Any] = {"eval_crops": int(reference.shape[0]), "calib_crops": int(calib_reference.shape[0])}

    # How fragile the metric is: the top-1 margin of FP32's logits, FP16, one input step of noise.
    top2 = reference.topk(2, 1).values
    margin = top2[:, 0] - top2[:, 1]
    probs = torch.softmax(reference.double(), 1).max(1).values
    out["margin_quantiles"] = {str(q): float(margin.quantile(q)) for q in (0.05, 0.1, 0.25, 0.5)}
    out["top1_prob_median"] = float(probs.median())
    if device.type == "cuda":  # FP16 convolutions on a CPU: a slow path that took > 20 GB here
        half = copy.deepcopy(fp32).half()
        out["fp16"] = score(torch.cat([half(x.half()).float().cpu() for x in evaluation]), reference)
        del half
    generator = torch.Generator(device="cpu").manual_seed(0)
    noisy = [x + ((torch.rand(x.shape, generator=generator) - 0.5) / 127).to(device) for x in evaluation]
    out["fp32_input_step_noise"] = score(logits_of(fp32, noisy), reference)
    # The image alone on the INT8 grid (what the stem's input quantizer does; everything else FP32).
    image_amax = max(float(x.abs().max()) for x in calib)
    out["image_only_int8"] = {"amax": image_amax, **score(logits_of(fp32, [
        torch.clamp(torch.round(x * (127 / image_amax)), -127, 127) * (image_amax / 127) for x in evaluation]), reference)}
    print(json.dumps(out), file=sys.stderr, flush=True)
    if args.floors_only:
        print(C.machine_header("EfficientNet-Lite1: the agreement metric's floors") + "\n```\n" + json.dumps(out, indent=1) + "\n```")
        return

    def with_adaround(config: Any) -> Any:
        if not adaround_params:
            return config
        return config.replace(algorithm_params={"adaround": adaround_params})

    # Activations only: BN folded, FP weights, every input INT8 (max).
    model, config, loop, statistics, ranges = prepared(fp32, ["bn-fold"], calib)
    apply_ranges(model, ranges)
    weight_names = [r.module_name for r in iter_quantizers(model) if r.role is Role.WEIGHT]
    saved = [(r.quantizer, r.quantizer.mode) for r in iter_quantizers(model) if r.role is Role.WEIGHT]
    for q, _ in saved:
        q.off()
    out["activations_only"] = score(logits_of(model, evaluation), reference)
    for q, mode in saved:
        q.restore(mode)
    out["bn_fold_max"] = score(logits_of(model, evaluation), reference)
    del model, weight_names

    # The baseline: the algorithms with max ranges.
    model, config, loop, statistics, ranges = prepared(fp32, algorithms, calib)
    config = with_adaround(config)
    out["baseline_refine_s"] = refined(model, config, loop, statistics, ranges)["refine_s"]
    out["baseline"] = score(logits_of(model, evaluation), reference)
    inputs = input_quantizers(model)
    saved = [(r.quantizer, r.quantizer.mode) for r in inputs]
    for q, _ in saved:
        q.off()
    out["weights_only"] = score(logits_of(model, evaluation), reference)
    for q, mode in saved:
        q.restore(mode)
    first = inputs[0]
    first.quantizer.off()
    out["image_input_float"] = {"layer": first.module_name, **score(logits_of(model, evaluation), reference)}
    first.quantizer.restore("quantize")
    print(json.dumps(out), file=sys.stderr, flush=True)
    if args.per_layer:
        gains = []
        for ref in inputs:
            mode = ref.quantizer.mode
            ref.quantizer.off()
            s = score(logits_of(model, evaluation), reference)
            ref.quantizer.restore(mode)
            gains.append({"layer": ref.module_name, "amax": ranges.inputs.get(ref.module_name),
                          "agreement_gain": s["agreement"] - out["baseline"]["agreement"],
                          "kl_ratio": s["kl"] / out["baseline"]["kl"]})
        gains.sort(key=lambda g: g["kl_ratio"])
        out["per_layer_input_off"] = gains
    del model

    for experiment in [e.strip() for e in args.experiments.split(",") if e.strip()]:
        model, config, loop, statistics, ranges = prepared(fp32, algorithms, calib)
        config = with_adaround(config)
        start = time.perf_counter()
        if experiment == "local":
            multiples = local_search(model, ranges, calib, args.local_samples)
        elif experiment == "greedy":
            multiples = greedy_search(model, ranges, calib, calib_reference)
        elif experiment == "shift":
            del model
            out[experiment] = shift_experiment(fp32, calib, evaluation, reference, algorithms, with_adaround)
            print(json.dumps({experiment: out[experiment]}), file=sys.stderr, flush=True)
            continue
        elif experiment in ("pixels", "bits9"):
            del model
            out[experiment] = representation_experiment(experiment, fp32, calib, evaluation, reference, algorithms,
                                                         with_adaround)
            print(json.dumps({experiment: out[experiment]}), file=sys.stderr, flush=True)
            continue
        elif experiment == "diversity":
            out[experiment] = calibration_diversity(fp32, calib, algorithms, with_adaround, args.batch_size, device)
            print(json.dumps({experiment: out[experiment]}), file=sys.stderr, flush=True)
            del model
            continue
        elif experiment.startswith("block"):
            # Block reconstruction instead of the pipeline's AdaRound, then bias correction.
            from quantlab.algorithms import AlgorithmContext, get_algorithm
            from quantlab.pipeline.refine import refinable_state
            apply_ranges(model, ranges)
            before_state = refinable_state(model)
            units = block_reconstruction(model, calib, iterations=int(experiment[5:] or 300))
            block_s = time.perf_counter() - start
            after_block = score(logits_of(model, evaluation), reference)
            if "bias-correction" in algorithms:
                get_algorithm("bias-correction").run(model, AlgorithmContext(forward_loop=loop, reference_state=before_state))
            out[experiment] = {"seconds": time.perf_counter() - start, "block_s": block_s, "before_bias_correction": after_block,
                               **score(logits_of(model, evaluation), reference),
                               "units_kept_nearest": [k for k, v in units.items() if v["kept"] == "nearest"],
                               "loss_ratio": {k: v["after"] / v["before"] for k, v in units.items() if v["before"] > 0}}
            print(json.dumps({experiment: out[experiment]}), file=sys.stderr, flush=True)
            del model
            continue
        else:
            raise SystemExit(f"unknown experiment {experiment!r}")
        search_s = time.perf_counter() - start
        new_ranges = scaled(ranges, multiples)
        apply_ranges(model, new_ranges)
        before_refine = score(logits_of(model, evaluation), reference)
        refine_s = refined(model, config, loop, statistics, new_ranges)["refine_s"]
        out[experiment] = {"search_s": search_s, "refine_s": refine_s, "before_refine": before_refine,
                           **score(logits_of(model, evaluation), reference),
                           "multiples": {k: v for k, v in multiples.items() if v != 1.0}}
        print(json.dumps({experiment: out[experiment]}), file=sys.stderr, flush=True)
        del model

    text = json.dumps(out, indent=1)
    print(C.machine_header("EfficientNet-Lite1: where the INT8 loss lives") + "\n```\n" + text + "\n```")
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
