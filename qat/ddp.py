"""DDP helpers for the training side: the core's communication (:mod:`quantlab.distributed`)
under its QAT name, and the checks that keep every rank's ranges identical."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from quantlab.attach import iter_quantizers
from quantlab.batching import shard_batches  # noqa: F401 - re-exported
from quantlab.distributed import (  # noqa: F401 - re-exported
    DistInfo,
    RankFailedError,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    comm_device,
    default_device,
    destroy,
    init_from_env,
    is_distributed,
    is_main_process,
    raise_if_any_rank_failed,
    rank,
    unwrap,
    world_group,
    world_size,
)
from quantlab.pipeline import amax_on_host


def broadcast_ranges(model: nn.Module, src: int = 0) -> int:
    """Copies every quantizer's amax from rank ``src`` to all ranks (collective).

    Returns the number of quantizers broadcast (0 when not distributed).
    """
    if not is_distributed():
        return 0
    quantizers = [r.quantizer for r in iter_quantizers(model)]
    if not quantizers:
        return 0
    device = comm_device()
    flat = torch.cat([q.amax.detach().reshape(-1).to(device, torch.float32) for q in quantizers])
    dist.broadcast(flat, src=src)
    modes = torch.tensor([list(type(q.mode)).index(q.mode) for q in quantizers], dtype=torch.int64, device=device)
    dist.broadcast(modes, src=src)
    offset = 0
    for q, mode_index in zip(quantizers, modes.tolist()):
        n = q.amax.numel()
        with torch.no_grad():
            q.amax.copy_(flat[offset : offset + n].reshape(q.amax.shape).to(q.amax.device))
        q.restore(list(type(q.mode))[mode_index])
        offset += n
    return len(quantizers)


class RangeMismatchError(RuntimeError):
    """The ranks of one job hold different ranges (amax) for the same quantizers."""


def check_ranges_agree(model: nn.Module) -> int:
    """Verifies that every rank holds bit-identical amax for every quantizer (collective).

    Ranges are all-reduced or broadcast, and learned ranges move with DDP's
    averaged gradients, so they should never differ; this check turns a silent
    divergence (a rank that skipped a collective, a non-deterministic kernel)
    into an error naming the quantizers.

    Returns:
        The number of quantizers compared (0 when not distributed).

    Raises:
        RangeMismatchError: naming up to five differing quantizers and the ranks.
    """
    if not is_distributed():
        return 0
    refs = list(iter_quantizers(unwrap(model)))
    mine = {r.key: amax.numpy().tobytes() for r, amax in zip(refs, amax_on_host([r.quantizer for r in refs]))}
    every = all_gather_object(mine)
    differing = []
    for key, value in mine.items():
        ranks = [r for r, theirs in enumerate(every) if theirs.get(key) != value]
        if ranks:
            differing.append(f"{key} (rank {rank()} vs rank(s) {ranks})")
    missing = sorted(set().union(*every) ^ set(mine))
    if differing or missing:
        shown = (differing + [f"{k} (missing on some ranks)" for k in missing])[:5]
        more = len(differing) + len(missing) - len(shown)
        raise RangeMismatchError("ranges differ across ranks: " + "; ".join(shown) + (f"; and {more} more" if more > 0 else ""))
    return len(mine)
