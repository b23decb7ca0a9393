"""``quantlab compare``: FP32 vs FP16 vs INT8 (every calibrator) on the same eval data."""
from __future__ import annotations

import argparse

from quantlab.cli._runs_common import StageProgress, add_store_arg, fmt, fmt_delta, open_store
from quantlab.cli._sparsity import add_sparsity_args, validate_sparsity
from quantlab.cli.common import (
    add_model_args,
    add_quant_args,
    calibrator_params_from_args,
    input_paths,
    load_cli_model,
    print_table,
    quant_config_from_args,
)


def register(sub) -> None:
    p = sub.add_parser("compare", help="evaluate FP32, FP16 and INT8 per calibrator; record the run")
    add_model_args(p)
    p.add_argument("--data", required=True, help="calibration data: fmnist:calib, rotten:calib, fortunes:calib, csv:PATH, ...")
    p.add_argument("--eval", required=True, help="eval data: fmnist:test, rotten:test, fortunes:test, ...")
    p.add_argument("--metric", default="top1",
                   help="top1, top5, cosine, probe_accuracy, perplexity, token_agreement, ... or module:function (default top1)")
    p.add_argument("--calibrators", default="all", help="comma list or 'all' (default all)")
    p.add_argument("--precisions", default="fp32,fp16,int8", help="comma list of fp32, fp16, int8 (default all three)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", "--calib-batches", dest="max_batches", type=int, default=None,
                   help="use at most this many calibration batches")
    p.add_argument("--eval-batches", type=int, default=None, help="evaluate at most this many batches")
    p.add_argument("--layer-batches", type=int, default=2, help="eval batches for per-layer SQNR (0 = skip; default 2)")
    p.add_argument("--out", required=True, help="run folder: run.json, scales.<calibrator>.json, results.json")
    p.add_argument("--checkpoint", help="also evaluate this quantized checkpoint (model.<calibrator>.safetensors, rebuilt on "
                                        "--model with the scales beside it) as an INT8 row")
    add_store_arg(p)
    add_quant_args(p)
    add_sparsity_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.cli._progress import stage
    from quantlab.data import load_data
    from quantlab.data.fit import check_model_fits
    from quantlab.evaluation.compare import parse_precisions
    from quantlab.evaluation.tasks import task_for_metric
    from quantlab.jobs.compare import run_compare
    from quantlab.jobs.folders import JOB_FILES, open_run_folder
    from quantlab.ptq import parse_calibrators

    precisions = parse_precisions(args.precisions)  # validate before any expensive work
    calibrators = parse_calibrators(args.calibrators) if "int8" in precisions else []
    task, metric = task_for_metric(args.metric)
    config = quant_config_from_args(args)  # unknown --algorithms / --algorithm-param fail here, before any work
    checkpoint = None
    if args.checkpoint:
        from quantlab.checkpoint import read_checkpoint

        if "int8" not in precisions:
            raise ValueError("--checkpoint adds an INT8 row: keep int8 in --precisions")
        checkpoint = read_checkpoint(args.checkpoint, tensors=False)[0]  # a bad file fails before any work
    store = open_store(args)
    # Before any work: --out is checked and locked (a second run on the same folder is refused).
    with open_run_folder(args.out, kind="compare", inputs=input_paths(args), keep=JOB_FILES) as folder:
        stage("loading model and data")
        # The model first: an examples/ factory module may register the datasets it needs.
        model = load_cli_model(args, args.data if "int8" in precisions else args.eval)
        validate_sparsity(args, model)  # a pattern that matches nothing fails before any evaluation
        calib = load_data(args.data, batch_size=args.batch_size) if "int8" in precisions else None
        eval_data = load_data(args.eval, batch_size=args.batch_size)
        for spec, data in ((args.data, calib), (args.eval, eval_data)):
            if data is not None:
                check_model_fits(model, data, spec)  # two samples first: a shape mismatch in words, before any pass
        describe = {
            "model": args.model, "data": args.data, "eval_data": args.eval,
            "weights": args.weights, "device": args.device, "batch_size": args.batch_size,
        }
        sparsity = None
        if args.sparsity:
            from quantlab.sparsity.compare import SparseCompare

            sparsity = SparseCompare(method=args.sparsity_method, include=tuple(args.sparsity_include or ["*"]),
                                     exclude=tuple(args.sparsity_exclude))
        extra = None
        if checkpoint is not None:
            from quantlab.checkpoint import load_checkpoint
            from quantlab.evaluation.compare import Candidate

            quantized = load_checkpoint(load_cli_model(args, args.data), checkpoint.path)  # mismatches fail before any pass
            source = checkpoint.source or "+".join(["ptq"] + checkpoint.algorithms())

            def extra(_ptq):
                return [Candidate("int8", checkpoint.calibrator, source, quantized)]

            describe["checkpoint"] = args.checkpoint
        with StageProgress() as progress:
            result = run_compare(
                model, calib, eval_data,
                metric=metric, task=task, calibrators=calibrators, precisions=precisions,
                config=config, calib_batches=args.max_batches, eval_batches=args.eval_batches,
                calibrator_params=calibrator_params_from_args(args), layer_batches=args.layer_batches,
                store=store, run_dir=args.out, describe=describe, progress=progress, folder=folder, sparsity=sparsity,
                extra_candidates=extra,
            )
    metrics = list(dict.fromkeys(r.metric for r in result.rows))
    metrics.sort(key=lambda m: m != result.metric)
    table = {}
    for row in result.rows:
        key = (row.precision, row.calibrator or "-", row.source)
        table.setdefault(key, {"seconds": row.seconds})[row.metric] = row
    headers = ["precision", "calibrator"] + [h for m in metrics for h in (m, f"Δ {m}")] + ["seconds"]
    lines = []
    for (precision, calibrator, source), cells in table.items():
        line = [precision + ("" if source == "ptq" else f" ({source})"), calibrator]
        for m in metrics:
            r = cells.get(m)
            line += [fmt(r.value) if r else "-", fmt_delta(r.delta) if r else "-"]
        lines.append(line + [f"{cells['seconds']:.1f}" if cells["seconds"] is not None else "-"])
    print(f"{args.model} on {args.eval}: {result.eval_batches} eval batches")
    print_table(lines, headers)
    if result.ptq is not None:
        print(f"statistics pass: {result.ptq.num_batches} batches in {result.ptq.statistics_seconds:.1f} s (shared by {len(calibrators)} calibrators)")
    if result.best_calibrator:
        best = result.best_row
        print(f"best INT8 calibrator by {result.metric}: {result.best_calibrator}"
              + (f" ({best.source})" if best is not None and best.source != "ptq" else ""))
    for source, variant in result.variants.items():
        for report in variant.ptq.transforms if source == list(result.variants)[-1] else ():
            print(f"transform {report.name}: {report.seconds:.2f} s")
    if result.layer_errors and result.best_calibrator in result.layer_errors:
        worst = sorted(result.layer_errors[result.best_calibrator], key=lambda e: e.proxy_db)[:5]
        print(f"lowest per-token SQNR, layer alone ({result.best_calibrator}): " + ", ".join(f"{e.layer} {fmt(e.proxy_db, 3)} dB" for e in worst))
    if result.sparsity is not None:
        _print_sparsity(result.sparsity)
    print(f"run {result.run_id} recorded in {store.path}; folder {args.out}")
    return 0


def _print_sparsity(outcome) -> None:
    """What the 2:4 + INT8 rows pruned and, where measured, their speed against FP16."""
    for report in outcome.reports:
        skipped = f"; left dense: {', '.join(n for n, _ in report.skipped)}" if report.skipped else ""
        print(f"2:4 + INT8 rows: {len(report.layers)} layer(s) pruned ({report.method}){skipped}")
    speed = outcome.speed
    if speed is None:
        print(f"2:4 speed: not measured ({outcome.speed_note})")
        return
    print(f"2:4 speed (one eval batch, Linear layers on cuSPARSELt, the rest FP16; {speed['timing']}): FP16 {speed['fp16_ms']:.3f} ms, "
          f"2:4 INT8 {speed['int8_ms']:.3f} ms, {speed['speedup']:.2f}x")
