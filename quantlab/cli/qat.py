"""``quantlab qat``: quantization-aware fine-tuning with the built-in loop (also under torchrun)."""
from __future__ import annotations

import argparse

from quantlab.cli._sparsity import add_sparsity_args, apply_sparsity, validate_sparsity
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
    p = sub.add_parser("qat", help="fine-tune with fake quantization (QAT) to recover INT8 accuracy")
    add_model_args(p)
    p.add_argument("--data", required=True, help="training data: fmnist:train, csv:PATH, ...")
    p.add_argument("--eval", required=True, help="eval data: fmnist:test, ...")
    p.add_argument("--out", required=True, help="run folder: checkpoint, scales.json, model.pt, run.json")
    p.add_argument("--scales", help="starting scales file (else calibrate from --calib-data)")
    p.add_argument("--checkpoint", help="start from a quantized checkpoint model.<calibrator>.safetensors (weights changed by "
                                        "PTQ algorithms) and the scales beside it (or --scales); give it again with --resume")
    p.add_argument("--calib-data", default=None, help="calibration data when no --scales (default: the training data)")
    p.add_argument("--calibrator", default="entropy", help="calibrator for the starting ranges (default entropy)")
    p.add_argument("--calib-batches", type=int, default=16,
                   help="calibration batches, all ranks together under torchrun (default 16)")
    p.add_argument("--task", choices=["classification", "causal-lm"], default="classification")
    p.add_argument("--metric", default=None, help="eval metric (default top1, perplexity for causal-lm)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-4, help="peak LR of the cosine schedule (default 1e-4)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--range-lr", type=float, default=1e-3, help="AdamW: learned ranges move ~ this fraction per step (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learn-amax", action="store_true", help="learn activation ranges (LSQ)")
    p.add_argument("--weight-ranges", choices=["recompute", "learn", "fixed"], default="recompute")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into convs as TensorRT deploys them")
    p.add_argument("--freeze-bn-after", type=int, default=None, help="freeze BatchNorm statistics after N steps")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm during training)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="replay each full batch's forward and backward as CUDA graphs: auto (on one GPU outside torchrun; "
                        "eager elsewhere or when the step cannot be captured), on (an error where graphs cannot run), "
                        "off (default auto)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--eval-batches", type=int, default=None, help="evaluate on at most this many batches")
    p.add_argument("--no-store", action="store_true", help="do not record the run in the run store")
    add_quant_args(p)
    add_sparsity_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from quantlab.cli._progress import StageProgress, stage
    from quantlab.data import load_data
    from quantlab.data.fit import check_model_fits
    from quantlab.jobs.folders import check_run_folder, open_on_main_rank
    from quantlab.jobs.qat import run_qat
    from quantlab.qat import ddp
    from quantlab.qat.errors import QATError
    from quantlab.qat.loop import TrainConfig
    from quantlab.qat.run import read_resumable

    quant_config_from_args(args)  # unknown --algorithms / --algorithm-param fail here, before any work
    if args.cuda_graphs == "on" and args.device is not None and torch.device(args.device).type != "cuda":
        raise QATError(f"--cuda-graphs on needs a CUDA device, not --device {args.device}; use auto or off")
    checkpoint = _read_checkpoint(args)  # a bad checkpoint or scales that need one fail here too
    inputs = input_paths(args)
    if args.resume:
        read_resumable(Path(args.out))  # a finished run is refused here: nothing recorded, nothing written
    # Every rank, before any work (the same answer everywhere); the scales of a resumed run are its own.
    check_run_folder(args.out, inputs={k: v for k, v in inputs.items() if not args.resume or k != "--scales"})
    info = ddp.init_from_env(args.device)
    device = ddp.default_device(info, args.device) if info.distributed else args.device
    main = info.is_main
    folder = None
    try:
        # Rank 0 alone writes the folder and holds its lock; a refusal is raised on every rank.
        folder = open_on_main_rank(args.out, main=main, kind="qat", inputs=None if args.resume else inputs,
                                   purpose="quantlab qat" + (" --resume" if args.resume else ""))
        train_config = TrainConfig(
            task=args.task.replace("-", "_"), epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
            warmup_steps=args.warmup_steps, optimizer=args.optimizer, weight_decay=args.weight_decay, range_lr=args.range_lr,
            batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
            freeze_bn_after=args.freeze_bn_after, seed=args.seed, sync_batchnorm=args.sync_bn,
            cuda_graphs=args.cuda_graphs,
        )
        stage("loading model and data", main_rank=main)
        model = load_cli_model(args, args.data, device=device)
        scales = args.scales
        if checkpoint is not None:
            from quantlab.checkpoint import load_checkpoint, paired_scales

            load_checkpoint(model, checkpoint.path, with_scales=False)  # the transformed structure and weights
            scales = args.scales or paired_scales(checkpoint)
        validate_sparsity(args, model)  # a pattern that matches nothing fails before any training
        train_data = load_data(args.data, batch_size=args.batch_size)
        eval_data = load_data(args.eval, batch_size=args.batch_size)
        for spec, data in ((args.data, train_data), (args.eval, eval_data)):
            check_model_fits(model, data, spec)  # two samples first: a shape mismatch in words, before any pass
        calib_data = None
        if not scales and not args.resume:
            calib = load_data(args.calib_data or args.data, batch_size=args.batch_size)
            # Each rank calibrates on its share of the first --calib-batches batches; prepare()
            # merges the statistics exactly, so the ranges equal a one-process run's.
            calib_data = ddp.shard_batches(calib, info.rank, info.world_size, args.calib_batches)
        prune = None
        if args.sparsity:
            # Every rank prunes the same way: sparsegpt sees the same (unsharded) calibration batches.
            prune_data = load_data(args.calib_data or args.data, batch_size=args.batch_size) if args.sparsity_method == "sparsegpt" else None

            def _prune(m) -> None:
                summary = apply_sparsity(args, m, prune_data, max_batches=args.calib_batches)
                if main:
                    print(summary)

            prune = _prune
        store = None
        if not args.no_store and main:
            from quantlab.store import RunStore

            store = RunStore()
        stage("FP32 reference, starting ranges, then training", main_rank=main)
        with StageProgress(main_rank=main) as steps:

            def progress(p) -> None:
                steps("training (QAT)", p.step, p.total_steps)

            result = run_qat(
                model, train_data, eval_data, out_dir=args.out, scales=scales, calib_data=calib_data,
                calibrator=args.calibrator, calibrator_params=calibrator_params_from_args(args).get(args.calibrator),
                quant_config=quant_config_from_args(args),
                train_config=train_config, learn_amax=args.learn_amax, weight_ranges=args.weight_ranges,
                fold_bn=args.fold_bn, metric=args.metric, eval_max_batches=args.eval_batches, resume=args.resume,
                store=store, describe={"model": args.model, "data": args.data, "eval_data": args.eval},
                progress=progress, folder=folder, prune=prune,
            )
        if main:
            m = result.metric
            label = "2:4 + int8" if result.sparse else "int8"
            print_table(
                [["fp32", "-", f"{result.fp32:.4g}", "-"],
                 [label, f"ptq ({result.calibrator})", f"{result.ptq:.4g}", f"{result.ptq - result.fp32:+.3g}"],
                 [label, "qat", f"{result.qat:.4g}", f"{result.qat - result.fp32:+.3g}"]],
                ["precision", "source", m, "delta"],
            )
            t = result.train
            print(f"{t.steps} steps in {t.seconds:.1f} s ({t.seconds / max(1, t.steps - (t.resumed_from or 0)) * 1000:.1f} ms/step)"
                  + (f", resumed from step {t.resumed_from}" if t.resumed_from else ""))
            print(_graphs_line(t.cuda_graphs))
            for role, path in result.files.items():
                print(f"{role}: {path}")
            if result.run_id:
                print(f"run: {result.run_id}")
        return 0
    finally:
        if folder is not None:
            folder.close()
        if info.distributed:
            ddp.destroy()


def _graphs_line(report) -> str:
    """One line on how the training steps ran (CUDA graphs or eager, and why)."""
    if not report:
        return "CUDA graphs: -"
    if report["used"]:
        line = f"CUDA graphs: {report['graphed_steps']} steps replayed, {report['eager_steps']} eager, {report['captures']} capture(s)"
        return line + (f"; then eager: {report['eager_reason']}" if report.get("eager_reason") else "")
    return f"CUDA graphs: not used ({report.get('eager_reason') or 'no full batch'})"


def _read_checkpoint(args: argparse.Namespace):
    """--checkpoint's header (checked), or None; --scales whose weights algorithms changed need it."""
    if args.checkpoint:
        from quantlab.checkpoint import read_checkpoint

        return read_checkpoint(args.checkpoint, tensors=False)[0]
    if args.scales and not args.resume:
        from quantlab.scales import Scales

        if Scales.load(args.scales).changed_weights():
            raise ValueError(f"--scales {args.scales} fit weights changed by PTQ algorithms: "
                             "give their checkpoint too (--checkpoint model.<calibrator>.safetensors)")
    return None
