"""``--sparsity 2:4`` and its options, shared by prune / compare / qat / export."""
from __future__ import annotations

import argparse
from typing import Any, Iterable, List, Optional


def add_sparsity_args(parser: argparse.ArgumentParser, *, flag: bool = True) -> None:
    """Adds ``--sparsity 2:4`` (unless ``flag`` is False: the command always prunes) and how to prune."""
    from quantlab.sparsity.pruning import METHODS

    if flag:
        parser.add_argument("--sparsity", choices=["2:4"], default=None,
                            help="2:4 structured sparsity along the input dimension (TensorRT's sparse Tensor Core kernels)")
    parser.add_argument("--sparsity-method", choices=METHODS, default="magnitude",
                        help="how to prune: magnitude, or sparsegpt (one-shot, second order, needs calibration data; Linear layers)")
    parser.add_argument("--sparsity-include", action="append", default=None, help="module-name pattern to prune (repeatable; default *)")
    parser.add_argument("--sparsity-exclude", action="append", default=[], help="module-name pattern to keep dense (repeatable)")


def validate_sparsity(args: argparse.Namespace, model: Any) -> None:
    """Fails before any work when the selection cannot be pruned (names the pattern or layer)."""
    if getattr(args, "sparsity", "2:4") is None:
        return
    from quantlab.sparsity.pattern import select_layers

    select_layers(model, tuple(args.sparsity_include or ["*"]), tuple(args.sparsity_exclude or []))


def apply_sparsity(args: argparse.Namespace, model: Any, data: Optional[Iterable[Any]] = None, *, max_batches: Optional[int] = None) -> Optional[str]:
    """Gives ``model`` its 2:4 masks as the arguments ask; returns a one-line summary (None without --sparsity).

    Weights that are already 2:4 in every selected layer (a checkpoint of an earlier
    sparse run, passed with ``--weights``) are kept as they are; otherwise the
    selected layers are pruned with ``--sparsity-method``.
    """
    if getattr(args, "sparsity", "2:4") is None:
        return None
    from quantlab.sparsity.errors import SparsityError
    from quantlab.sparsity.pruning import masks_from_weights, prune

    include = tuple(args.sparsity_include or ["*"])
    exclude = tuple(args.sparsity_exclude or [])
    try:
        adopted: List[str] = masks_from_weights(model, include, exclude)
    except SparsityError as exc:
        if "are not 2:4" not in str(exc):
            raise
    else:
        return f"2:4: kept the pattern of {len(adopted)} already-sparse layer(s)"
    report = prune(model, args.sparsity_method, include=include, exclude=exclude, data=data, max_batches=max_batches)
    skipped = f"; left dense: {', '.join(f'{n} ({r})' for n, r in report.skipped)}" if report.skipped else ""
    return f"2:4 ({report.method}): pruned {len(report.layers)} layer(s) in {report.seconds:.1f} s{skipped}"
