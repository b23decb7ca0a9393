"""``quantlab calibrate``: one statistics pass, every requested calibrator, scales files."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from quantlab.cli.common import (
    add_model_args,
    add_quant_args,
    input_paths,
    load_cli_model,
    calibrator_params_from_args,
    print_table,
    progress_bar,
    quant_config_from_args,
)


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="collect statistics once and write scales for each calibrator")
    add_model_args(p)
    p.add_argument("--data", required=True, help="calibration data: fmnist:calib, csv:PATH, parquet:PATH, ...")
    p.add_argument("--calibrators", default="all", help="comma list or 'all' (default all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", type=int, default=None, help="use at most this many batches")
    p.add_argument("--out", required=True, help="output folder for scales.<calibrator>.json (and model.<calibrator>.safetensors "
                   "when --algorithms change the weights)")
    add_quant_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab import distributed
    from quantlab.jobs.folders import check_run_folder, open_on_main_rank

    from quantlab.ptq import parse_calibrators

    parse_calibrators(args.calibrators)  # bad names and --algorithms fail before any work
    quant_config_from_args(args)
    inputs = input_paths(args)
    check_run_folder(args.out, inputs=inputs)  # every rank: the same answer, before any work
    info = distributed.init_from_env(args.device)
    folder = None
    try:
        # Rank 0 alone writes: it alone holds the folder's lock; a refusal is raised on every rank.
        folder = open_on_main_rank(args.out, main=info.is_main, kind="calibrate", inputs=inputs)
        return _calibrate(args, info, folder)
    finally:
        if folder is not None:
            folder.close()  # an uncommitted stage is discarded: the previous folder stays whole
        if info.distributed:
            distributed.destroy()


def _calibrate(args: argparse.Namespace, info, folder) -> int:
    """One process's part; under torchrun each rank takes every ``world_size``-th batch."""
    from quantlab import distributed
    from quantlab._io import write_text_atomic
    from quantlab.data import load_data
    from quantlab.batching import shard_batches
    from quantlab.data.fit import check_model_fits
    from quantlab.ptq import parse_calibrators, run_ptq
    from quantlab.roles import Role

    from quantlab.cli._progress import stage

    names = parse_calibrators(args.calibrators)  # validate before any expensive work
    stage("loading model and data", main_rank=info.is_main)
    device = distributed.default_device(info, args.device) if info.distributed else args.device
    model = load_cli_model(args, args.data, device=device)
    data = load_data(args.data, batch_size=args.batch_size)
    check_model_fits(model, data, args.data)  # two samples first: a shape mismatch in words, before the pass
    shard = shard_batches(data, info.rank, info.world_size, args.max_batches)
    try:
        total: Optional[int] = len(shard)  # this rank's batches
    except TypeError:
        total = None
    with progress_bar(total, "statistics", shown=info.is_main) as progress:
        result = run_ptq(
            model,
            shard,
            names,
            config=quant_config_from_args(args),
            calibrator_params=calibrator_params_from_args(args),
            progress=progress,
            across_ranks=info.distributed,
        )
    if not info.is_main:
        return 0  # every rank holds the same ranges; rank 0 writes them
    from quantlab.jobs.folders import commit_files

    from quantlab.checkpoint import save_ptq_files

    def write(stage: Path) -> dict:
        staged = save_ptq_files(result, model, stage)
        summary = {
            "model": args.model,
            "data": args.data,
            "num_batches": result.num_batches,
            "world_size": info.world_size,
            "statistics_seconds": result.statistics_seconds,
            "calibrate_seconds": result.calibrate_seconds,
            "scales": {k[len("scales."):]: str(folder.final(v)) for k, v in staged.items() if k.startswith("scales.")},
            "checkpoints": {k[len("model."):]: str(folder.final(v)) for k, v in staged.items() if k.startswith("model.")},
            "algorithms": {"transforms": [r.to_dict() for r in result.transforms],
                           "refinements": {k: [r.to_dict() for r in v] for k, v in result.refinements.items()}},
        }
        write_text_atomic(stage / "calibration.json", json.dumps(summary, indent=1))
        return staged

    # The whole folder (every scales file and calibration.json) is staged, then swapped in:
    # a kill at any moment leaves the previous complete folder or this one.
    paths = commit_files(folder, write)
    ranks = f" on {info.world_size} ranks" if info.distributed else ""
    print(f"statistics pass: {result.num_batches} batches{ranks} in {result.statistics_seconds:.2f} s")
    first = next(iter(result.scales.values()))
    inputs = [e.module for e in first.entries if e.role is Role.INPUT]
    rows = [[m] + [f"{result.scales[c].get(m, 'input').amax:.4g}" for c in names] for m in inputs]
    print_table(rows, ["layer input amax"] + names)
    for report in result.transforms:
        print(f"transform {report.name}: {report.seconds:.2f} s")
    for name, path in paths.items():
        calibrator = name.split(".", 1)[1]
        print(f"{name}: {path}  ({result.calibrate_seconds[calibrator] * 1000:.1f} ms)")
    return 0
