"""``quantlab cache``: TensorRT's legacy calibration cache (TensorRT <= 10, implicit INT8)."""
from __future__ import annotations

import argparse

from quantlab.cli.common import print_table


def register(sub) -> None:
    from quantlab.export.cache import header_note

    p = sub.add_parser("cache", help="write (or --show) a TensorRT calibration cache keyed by the FP32 ONNX tensor names",
                       description="Writes TensorRT's legacy calibration cache (TensorRT <= 10, implicit INT8) from a scales file, "
                                   "and <out>.json beside it (the header, which calibrator chose the scales, and this note). "
                                   + header_note())
    p.add_argument("--scales", help="scales file from `quantlab calibrate`")
    p.add_argument("--onnx", help="the FP32 ONNX file the cache is for (from `quantlab export --precision fp32`)")
    p.add_argument("--trt-version", help="the exact TensorRT version that will read it, e.g. 8.6.1 or 10.3.0 (header must match)")
    p.add_argument("--algorithm", default="EntropyCalibration2", help="header algorithm: the TensorRT calibrator that will READ the cache (EntropyCalibration2 = IInt8EntropyCalibrator2, "
                        "the default), not how the scales were chosen; with a matching header TensorRT uses the scales as they are")
    p.add_argument("--out", help="cache file to write (atomically)")
    p.add_argument("--allow-missing", action="store_true", help="skip layers whose tensor is not in the graph instead of failing")
    p.add_argument("--show", metavar="CACHE", help="print the entries of an existing cache (quantlab's or TensorRT's) and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.export.cache import cache_calibrator, header_note, read_calibration_cache, scale_to_hex, write_calibration_cache

    if args.show:
        cache = read_calibration_cache(args.show)
        print(f"{args.show}: TensorRT {cache.version}, {cache.algorithm}, {len(cache.scales)} tensor(s)")
        origin = cache_calibrator(args.show)
        print(f"note: {header_note(cache.algorithm, origin)}" if origin else
              f"note: the header's {cache.algorithm} names the TensorRT calibrator that reads the cache, not how the scales were chosen")
        print_table([[name, scale_to_hex(s), f"{s:.6g}", f"{s * 127:.6g}"] for name, s in cache.scales.items()],
                    ["tensor", "hex", "scale", "amax"])
        return 0
    missing = [flag for flag, value in (("--scales", args.scales), ("--onnx", args.onnx), ("--trt-version", args.trt_version), ("--out", args.out)) if not value]
    if missing:
        raise ValueError(f"writing a cache needs {', '.join(missing)} (or use --show CACHE)")
    path, cache = write_calibration_cache(args.scales, args.onnx, args.out, trt_version=args.trt_version,
                                          algorithm=args.algorithm, strict=not args.allow_missing)
    print(f"wrote {path}: header {cache.header}, {len(cache.scales)} tensor(s); metadata {path}.json")
    print(f"note: {header_note(cache.algorithm, _calibrator_of(args.scales))}")
    return 0


def _calibrator_of(scales_path: str):
    from quantlab.scales import Scales

    return Scales.load(scales_path).calibrator

