"""``quantlab autoprecision``: keep the fewest most-sensitive layers in FP16 to meet a maximum drop."""
from __future__ import annotations

import argparse

from quantlab.cli._runs_common import StageProgress, add_run_arg, add_store_arg, check_trust, fmt, open_store
from quantlab.cli.common import device_arg


def parse_max_drop(text: str):
    """``"0.2"`` (metric units) or ``"10%"`` (relative to FP32) -> (value, relative)."""
    text = str(text).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0, True
        return float(text), False
    except ValueError:
        raise ValueError(f"--max-drop must be a number (metric units) or a percentage like 10%, got {text!r}") from None


def register(sub) -> None:
    p = sub.add_parser("autoprecision", help="move the most sensitive layers to FP16 until the metric drop is within a target")
    add_run_arg(p)
    p.add_argument("--max-drop", required=True,
                   help="largest acceptable drop vs FP32: metric units (0.2 = 0.2 points top-1) or relative (10%%)")
    p.add_argument("--calibrator", default=None, help="whose scales to start from (default: the run's best)")
    p.add_argument("--from", dest="start", default="best",
                   help="the INT8 row to start from: best (default: the best PTQ row, algorithm rows included) "
                        "or a row's source such as ptq or ptq+cle")
    p.add_argument("--order", choices=("auto", "sensitivity", "proxy"), default="auto",
                   help="layer order: a saved `quantlab sensitivity` ranking, a fresh SQNR-proxied ranking, or auto (saved if present)")
    p.add_argument("--out", default=None, help="output folder (default <run>/autoprecision.<calibrator>)")
    p.add_argument("--device", default=None, type=device_arg, help="cpu, cuda, cuda:1 ... (default: the run's)")
    p.add_argument("--trust", action="store_true",
                   help="run the recorded model/metric file even if another user owns it (or the run folder or store)")
    add_store_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.jobs.autoprecision import run_autoprecision
    from quantlab.cli._progress import stage
    from quantlab.jobs.runs import load_run_info

    max_drop, relative = parse_max_drop(args.max_drop)
    info = load_run_info(args.run, args.store)
    store = open_store(args, run_info=info)
    check_trust(info, store, args.trust)
    stage(f"rebuilding the model and data of run {info.get('run_id') or info.get('run_dir')}")
    with StageProgress() as progress:
        outcome = run_autoprecision(info, store, max_drop=max_drop, relative=relative, calibrator=args.calibrator,
                                    order=args.order, out_dir=args.out, device=args.device, progress=progress,
                                    start=args.start)
    result = outcome["result"]
    target = f"{args.max_drop}" + ("" if relative else f" {result.metric}")
    started = "" if outcome.get("source", "ptq") == "ptq" else f", {outcome['source']}"
    print(f"{info['model']} ({outcome['calibrator']}{started}), metric {result.metric}, max drop {target} (= {fmt(result.max_drop)}):")
    print(f"  FP32 {fmt(result.fp32)} | all INT8 {fmt(result.int8)} | mixed {fmt(result.value)} "
          f"with {len(result.float_layers)} layer(s) in FP16 -> target {'met' if result.met else 'NOT met'}")
    print(f"  layer order from: {outcome['order_source']}; evaluations: "
          + ", ".join(f"{n} in FP16 -> {fmt(v)}" for n, v in result.evaluations))
    if result.float_layers:
        print("  kept in FP16: " + ", ".join(result.float_layers))
    for kind, path in outcome["artifacts"].items():
        print(f"  {kind}: {path}")
    if outcome.get("onnx_note"):
        print(f"  onnx: {outcome['onnx_note']}")
    print(f"run {outcome['run_id']} recorded in {store.path}")
    return 0 if result.met else 3
