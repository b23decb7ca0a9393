"""``quantlab sensitivity``: rank a compare run's layers by how much INT8 costs the metric."""
from __future__ import annotations

import argparse

from quantlab.cli._runs_common import StageProgress, add_run_arg, add_store_arg, check_trust, fmt, open_store
from quantlab.cli.common import device_arg, print_table


def register(sub) -> None:
    p = sub.add_parser("sensitivity", help="per-layer sensitivity ranking (SQNR proxy + metric for the top candidates)")
    add_run_arg(p)
    p.add_argument("--calibrator", default=None, help="whose scales to use (default: the run's best)")
    p.add_argument("--top-k", type=int, default=None, help="candidates to evaluate with the metric (default: as many as the budget allows)")
    p.add_argument("--budget", type=float, default=3.0, help="maximum cost in full eval passes (default 3)")
    p.add_argument("--subset-fraction", type=float, default=0.25, help="share of the eval batches per candidate (default 0.25)")
    p.add_argument("--full", action="store_true",
                   help="also evaluate EVERY layer on the same subset and report how well the proxy ranking agrees (expensive)")
    p.add_argument("--full-layers", type=int, default=None,
                   help="with --full: evaluate only N layers, evenly spaced along the proxy order (for models with hundreds of layers)")
    p.add_argument("--device", default=None, type=device_arg, help="cpu, cuda, cuda:1 ... (default: the run's)")
    p.add_argument("--trust", action="store_true",
                   help="run the recorded model/metric file even if another user owns it (or the run folder or store)")
    add_store_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.cli._progress import stage
    from quantlab.jobs.runs import load_run_info
    from quantlab.jobs.sensitivity import run_sensitivity

    info = load_run_info(args.run, args.store)
    store = open_store(args, run_info=info)
    check_trust(info, store, args.trust)  # before the recorded model file is imported
    stage(f"rebuilding the model and data of run {info.get('run_id') or info.get('run_dir')}")
    with StageProgress() as progress:
        outcome = run_sensitivity(info, store, calibrator=args.calibrator, top_k=args.top_k, budget_passes=args.budget,
                                  subset_fraction=args.subset_fraction, full=args.full,
                                  full_layers=args.full_layers, device=args.device, progress=progress)
    result = outcome["result"]
    print(f"sensitivity of {info['model']} ({outcome['calibrator']}), metric {result.metric}, "
          "method: quantize everything but one layer (metric recovered when that layer stays in FP16)")
    print(f"FP32 {fmt(result.fp32)}, all INT8 {fmt(result.baseline)} on {result.subset_batches}/{result.total_batches} eval batches; "
          f"{len(result.evaluated)} candidates evaluated; cost {result.cost_passes:.2f} eval passes, {result.seconds:.1f} s")
    shown = result.layers[: max(10, len(result.evaluated))]
    print_table(
        [[e.rank, e.layer, fmt(e.proxy_sqnr_db, 3), fmt(e.value), fmt(e.sensitivity, 3)] for e in shown],
        ["rank", "layer", "proxy SQNR dB", f"{result.metric} with layer in FP16", "recovered"],
    )
    if outcome["agreement"] is not None:
        for name, a in outcome["agreement"].items():
            print(f"proxy ({name}) vs full ranking over {int(a['layers'])} layers: Spearman {fmt(a['spearman'], 3)}, "
                  f"Kendall {fmt(a['kendall'], 3)}, top-5 overlap {fmt(a['top_k_overlap'], 2)}")
    print(f"run {outcome['run_id']} recorded in {store.path}; {outcome['path']}")
    return 0
