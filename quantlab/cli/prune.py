"""``quantlab prune``: 2:4 structured sparsity along the input dimension, written as a state_dict."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from quantlab.cli._sparsity import add_sparsity_args, apply_sparsity
from quantlab.cli.common import add_model_args, print_table


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune Linear/Conv weights to 2:4 along the input dimension (for TensorRT's sparse INT8 kernels)")
    add_model_args(p)
    add_sparsity_args(p, flag=False)
    p.add_argument("--data", help="calibration data for --sparsity-method sparsegpt (e.g. rotten:calib)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=8, help="sparsegpt: calibration batches (default 8)")
    p.add_argument("--out", required=True, help="state_dict of the pruned model (give it to --weights of calibrate/qat/compare/export)")
    p.add_argument("--report", help="also write the per-layer report as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from quantlab._io import atomic_path, write_text_atomic
    from quantlab.cli._progress import stage
    from quantlab.model_source import load_model
    from quantlab.sparsity.check import check_model_sparsity
    from quantlab.sparsity.mask import remove_masks

    out = Path(args.out)
    for given in (args.weights, args.model):
        if given and Path(given).resolve() == out.resolve():
            raise ValueError(f"--out {out} would overwrite an input; choose another file")
    if args.sparsity_method == "sparsegpt" and not args.data:
        raise ValueError("--sparsity-method sparsegpt needs --data (its weight update uses the layers' inputs)")
    stage("loading model" + (" and data" if args.data else ""))
    model = load_model(args.model, weights=args.weights, device=args.device)
    data = None
    if args.data:
        from quantlab.data import load_data

        data = load_data(args.data, batch_size=args.batch_size)
    args.sparsity = "2:4"
    stage(f"pruning to 2:4 ({args.sparsity_method})")
    summary = apply_sparsity(args, model, data, max_batches=args.max_batches)
    report = check_model_sparsity(model)
    remove_masks(model)  # the weights are baked: a plain state_dict of the original architecture
    with atomic_path(out) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    rows = [[layer.layer, layer.op, "x".join(map(str, layer.shape)), "yes" if layer.compliant else ("-" if not layer.eligible else "no"),
             layer.reason or ""] for layer in report.layers]
    print_table(rows, ["layer", "op", "weight", "2:4", "why not"])
    print(summary)
    if args.report:
        write_text_atomic(args.report, json.dumps(report.to_dict(), indent=1))
    print(f"wrote {out}; use it with --weights {out} (the sparse layers keep their pattern with --sparsity 2:4)")
    return 0
