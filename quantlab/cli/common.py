"""Arguments and helpers shared by several sub-commands."""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Iterator, Optional


def device_arg(text: str) -> str:
    """argparse type of --device: a device torch knows and this machine has (checked before any work)."""
    from quantlab.devices import check_device

    try:
        return check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="file.py:factory, package.module:factory, TorchScript .pt or exported .pt2")
    parser.add_argument("--weights", help="optional state_dict file (loaded with weights_only=True)")
    parser.add_argument("--device", default=None, type=device_arg, help="cpu, cuda, cuda:1 ... (default: where the factory puts the model)")


def load_cli_model(args: argparse.Namespace, example_data: Optional[str], device=None, example=None):
    """``load_model`` for --model/--weights/--device; a TorchScript file gets its example batch from ``example_data``."""
    from quantlab.jobs.export import example_inputs
    from quantlab.model_source import is_torchscript_spec, load_model

    if example is None and example_data and is_torchscript_spec(args.model):
        example = example_inputs(example_data)  # converting TorchScript needs a batch
    device = device if device is not None else args.device
    return load_model(args.model, weights=args.weights, device=str(device) if device is not None else None, example_inputs=example)


def input_paths(args: argparse.Namespace, *names: str) -> dict:
    """``{"--flag": local path}`` of the command's inputs (model, weights, data, eval, scales, onnx, ...)."""
    from quantlab.outputs import spec_path

    flags = names or ("model", "weights", "data", "eval", "calib_data", "scales", "onnx", "checkpoint")
    out = {}
    for name in flags:
        value = getattr(args, name, None)
        path = spec_path(value) if name in ("model", "data", "eval", "calib_data") else value
        if path:
            out["--" + name.replace("_", "-")] = path
    return out


def add_quant_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--include", action="append", default=None, help="module-name pattern to quantize (repeatable; default *)")
    parser.add_argument("--exclude", action="append", default=[], help="module-name pattern to keep in floating point (repeatable)")
    parser.add_argument("--per-tensor-weights", action="store_true", help="one weight scale per tensor instead of per channel")
    parser.add_argument("--percentile", type=float, default=99.99, help="percentile for the percentile calibrator (default 99.99)")
    parser.add_argument("--num-bins", type=int, default=2048, help="histogram bins per activation (default 2048)")
    parser.add_argument("--algorithms", default=None,
                        help="PTQ algorithms, comma list in any order (run in pipeline order), e.g. cle,bias-correction,adaround "
                             "(see `quantlab algorithms`)")
    parser.add_argument("--algorithm-param", action="append", default=[], metavar="ALGORITHM.NAME=VALUE",
                        help="a parameter of one of --algorithms, e.g. adaround.iterations=200 (repeatable)")


def algorithms_from_args(args: argparse.Namespace):
    """``(names, params)`` of --algorithms / --algorithm-param, checked (unknown names raise AlgorithmError)."""
    from quantlab.algorithms import check_params, parse_algorithms, parse_param_items

    names = tuple(a.name for a in parse_algorithms(getattr(args, "algorithms", None)))
    params = check_params(names, parse_param_items(getattr(args, "algorithm_param", None)))
    return names, params


def quant_config_from_args(args: argparse.Namespace):
    from quantlab.config import int8_config

    config = int8_config(
        include=tuple(args.include or ["*"]),
        exclude=tuple(args.exclude or []),
        per_channel_weights=not args.per_tensor_weights,
    )
    names, params = algorithms_from_args(args)
    return config.replace(num_bins=args.num_bins, algorithms=names, algorithm_params=params)


def calibrator_params_from_args(args: argparse.Namespace) -> dict:
    return {"percentile": {"percentile": args.percentile}}


@contextmanager
def progress_bar(total: Optional[int], desc: str, shown: bool = True) -> Iterator:
    """A stage message and a tqdm bar on stderr (only where ``shown``: rank 0 of a torchrun job; never with
    ``--quiet`` or when stderr is not a terminal); yields a ``progress(n_done)`` callback."""
    from quantlab.cli import _progress

    with _progress.progress_bar(total, desc, shown) as update:
        yield update


def add_quiet_arg(parser: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """``--quiet``: no stage messages or progress bars on stderr (results still go to stdout, errors to stderr).

    Progress is drawn only when stderr is a terminal anyway; a pipe or a log file gets none.
    """
    parser.add_argument("--quiet", "-q", action="store_true", default=default,
                        help="no stage messages or progress bars on stderr (drawn only on a terminal anyway); "
                             "results still go to stdout, errors to stderr")


def print_table(rows, headers) -> None:
    """Prints a plain markdown table to stdout (the CLI's output, not library code)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
