"""``quantlab build``: a strongly typed TensorRT engine from an ONNX file (needs TensorRT)."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("build", help="build a TensorRT engine (plan) from an ONNX file; --print-trtexec works without TensorRT")
    p.add_argument("model", help="ONNX file (Q/DQ INT8, FP16 or FP32)")
    p.add_argument("--out", required=True, help="plan file to write (atomically)")
    p.add_argument("--timing-cache", help="timing cache file, read if present and updated after the build")
    p.add_argument("--workspace-mib", type=int, default=1024, help="workspace memory limit in MiB (default 1024)")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--no-tf32", action="store_true", help="disable TF32 for a true FP32 baseline")
    p.add_argument("--trt-major", type=int, default=10, help="TensorRT major version for --print-trtexec (10 adds --stronglyTyped)")
    p.add_argument("--print-trtexec", action="store_true", help="print the equivalent trtexec command and exit")
    p.add_argument("--verbose-trt", action="store_true", help="TensorRT logger at VERBOSE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.runtimes.tensorrt.loader import BuildOptions, build_engine, format_command, trtexec_command

    options = BuildOptions(
        min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
        workspace_mib=args.workspace_mib, timing_cache=args.timing_cache, tf32=not args.no_tf32,
        verbose=args.verbose_trt,
    )
    if args.print_trtexec:
        print(format_command(trtexec_command(args.model, args.out, options, trt_major=args.trt_major)))
        return 0
    result = build_engine(args.model, args.out, options)
    print(f"wrote {result.plan} ({result.plan_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s with TensorRT {result.tensorrt_version}")
    if result.timing_cache:
        print(f"timing cache: {result.timing_cache}")
    return 0
