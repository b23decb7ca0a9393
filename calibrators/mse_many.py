"""The ``mse`` calibrator over many histograms at once (same amax as :mod:`.mse`).

Histograms are scored a chunk of several at a time as ``[histograms,
candidates, used bins]`` blocks (each histogram's used bins compacted to the
left and zero-padded, broadcast over its candidates), with the per-tensor
calibrator's element-wise operations in the same order, so every squared error
``(c - fq(c)) ** 2`` is the same float; a padded one is ``0 ** 2`` with weight 0.
Only the weighted sums may round differently (a matrix product instead of a
product then a sum; another order); a choice is kept only where that cannot
matter (see :mod:`.many`): a sum of non-negative terms is 0 only if every term
is, and a single term is the same in both. On a GPU one kernel scores every candidate at once
with the same float operations (:mod:`.mse_cuda`); the blocks are the fallback.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import HistogramBlock, HistogramStats, PendingChoice, register_batched_calibrator, register_block_calibrator
from .many import (EPS, block_choice, chunk_budget, even_rows, pack_counts, ragged, segment_any, segment_min, segment_pick,
                   split_trivial)
from .mse import _validate
from . import mse_cuda
from .mse_cuda import mse_scores

#: On accelerators MSE chunks are this many times the shared chunk budget: its blocks are computed in place (one
#: block alive), and on an H200 its time for ResNet-50's 54 histograms fell from 42 ms at 2**23
#: elements to 21 ms at 2**25 (BERT-base's 72: 28 to 21 ms; benchmarks/RESULTS.md).
MSE_CHUNK_FACTOR = 4

#: A sum of ``u`` non-negative terms is within ``u * eps`` (relative) of the
#: exact sum in any order, whether each product ``d**2 * w`` is rounded first
#: (per tensor) or not (a fused multiply-add in the matrix product): the two
#: differ by at most ``(2u + 1) * eps``; 4 keeps a factor 2 of margin.
_SUM_BOUND = 4.0


@register_batched_calibrator("mse")
def mse_many(
    stats: Sequence[HistogramStats], *, num_bits: int = 8, start_bin: int = 128, stride: int = 1
) -> List[Optional[float]]:
    """:func:`~.mse.mse_calibrator` for every histogram at once: one read-back with the
    GPU kernel of :mod:`.mse_cuda`, two with torch ops.

    Raises:
        ValueError: For ``num_bits < 2``, ``start_bin < 1`` or ``stride < 1``.
    """
    _validate(num_bits, start_bin, stride)
    out, rows = split_trivial(stats)
    if not rows:
        return out
    bins = pack_counts([stats[t].counts for t in rows])
    device = bins.device
    bin_width = torch.tensor([float(stats[t].bin_width) for t in rows], dtype=torch.float64).to(device, non_blocking=True)
    num_bins = [stats[t].num_bins for t in rows]
    values, host = _enqueue(bins, bin_width, None, num_bins, num_bits, start_bin, stride)
    return _settle_all(out, stats, rows, values.tolist() if host is None else host, start_bin)


@register_block_calibrator("mse", costly=True)  # a few ms of GPU work for a model
def mse_block(block: HistogramBlock, *, num_bits: int = 8, start_bin: int = 128, stride: int = 1) -> PendingChoice:
    """:func:`mse_many` on a :class:`HistogramBlock`: with the kernel, device work only.

    Every row is scored at the candidates ``start_bin, start_bin + stride, ...``
    below the block's width; those past the row's own bins are NaN candidates,
    which the kernel scores ``inf`` without work (never a minimum, never a
    close rival). Without the kernel the torch-op form runs here, reading back.
    """
    _validate(num_bits, start_bin, stride)
    values, host = _enqueue(block.counts, block.bin_width, block.num_bins, None, num_bits, start_bin, stride)
    return block_choice(values, lambda out, stats, rows, read: _settle_all(out, stats, rows, read, start_bin), host)


def _settle_all(out: List[Optional[float]], stats: Sequence[HistogramStats], rows: List[int],
                read: List[List[float]], start_bin: int) -> List[Optional[float]]:
    """Each row's answer from ``(valid, used bins, amax, doubt)`` (amax None: not searched)."""
    for r, (ok, n_used, amax, doubt) in enumerate(read):
        _settle(out, stats[rows[r]], rows[r], ok, int(n_used), start_bin, amax, doubt)
    return out


def _enqueue(bins: torch.Tensor, bin_width: torch.Tensor, sizes: Optional[torch.Tensor], num_bins: Optional[List[int]],
             num_bits: int, start_bin: int, stride: int) -> "tuple[torch.Tensor, Optional[List[List[Any]]]]":
    """Every row's ``(valid, used bins, chosen amax, doubt)``.

    The rows' bin counts are ``num_bins`` (host) or ``sizes`` (device, a block's).

    Returns:
        ``(values, None)`` with the kernel: a ``[rows, 4]`` tensor, nothing read back; else
        ``(empty, rows as lists)``, read back on the way (the blocks are sized on the host).
    """
    device = bins.device
    num_rows, width = bins.shape
    used = bins != 0
    valid = (torch.isfinite(bins) & (bins >= 0)).all(dim=1)
    used_count = used.sum(dim=1)
    qmax = float((1 << (num_bits - 1)) - 1)
    if mse_cuda.available(device):
        # The kernel walks each row's own used bins: every row is scored (the answers of rows that
        # need no search are ignored), so nothing is read back before the one read-back at the end.
        if sizes is None:
            seg, pos = ragged([len(range(start_bin, n, stride)) for n in num_bins], device)
            limit = None
        else:  # a block: the same candidates for every row, those past its bins NaN
            seg, pos = even_rows(num_rows, len(range(start_bin, width, stride)), device)
            limit = sizes
        chosen, unsure = _search(bins, bin_width, used, used_count, None, seg, pos, width, start_bin, stride, qmax,
                                 None, limit)
        return torch.stack([valid.to(torch.float64), used_count.to(torch.float64), chosen,
                            unsure.to(torch.float64)], dim=1), None
    if num_bins is None:
        num_bins = [int(n) for n in sizes.tolist()]
    searched: List[int] = []  # packed rows with candidates
    used_host: List[int] = []
    read: List[List[Any]] = []
    for r, (ok, n_used) in enumerate(torch.stack([valid.to(torch.int64), used_count], dim=1).tolist()):
        read.append([ok, n_used, None, True])
        if ok and n_used and num_bins[r] > start_bin:  # what _settle searches
            searched.append(r)
            used_host.append(int(n_used))
    if not searched:
        return bins.new_empty(num_rows, 0), read
    counts = [len(range(start_bin, num_bins[r], stride)) for r in searched]
    seg, pos = ragged(counts, device)
    chosen, unsure = _search(bins, bin_width, used, used_count, searched, seg, pos, max(used_host), start_bin, stride,
                             qmax, (counts, used_host), None)
    for r, (amax, doubt) in zip(searched, torch.stack([chosen, unsure.to(torch.float64)], dim=1).tolist()):
        read[r][2:] = [amax, doubt]
    return bins.new_empty(num_rows, 0), read


def _settle(out: List[Optional[float]], s: HistogramStats, t: int, ok: float, n_used: int, start_bin: int,
            amax: Optional[float], doubt: float) -> bool:
    """Answers histogram ``t`` where no search is needed, or from its search (``amax`` unless in ``doubt``).

    Returns:
        Whether it needs a search (valid counts, some used bin, more bins than ``start_bin``).
    """
    if not ok:
        return False  # negative or non-finite counts: the per-tensor form decides
    if n_used == 0:
        out[t] = 0.0
    elif s.num_bins <= start_bin:
        out[t] = float(s.amax)
    else:
        if amax is not None and not doubt:
            out[t] = amax
        return True
    return False


def _search(bins, bin_width, used, used_count, searched, seg, pos, most, start_bin, stride, qmax, blocks, limit):
    """The first minimum of every searched row's candidates and whether rounding could move it.

    ``searched``: the packed rows with candidates (None: every row); ``seg``/``pos``: the
    row (among the searched) and position of every candidate; ``most``: columns of the
    compacted bins (at least any searched row's used bins); ``blocks``: ``(candidates per
    searched row, used bins per searched row)`` on the host for the torch-op blocks, or None
    for the kernel; ``limit``: per row, the bins a candidate must lie below (a block's sizes:
    the others are absent), or None.
    """
    device = bins.device
    num_rows, width = bins.shape
    # Bin centres exactly as HistogramStats.edges and the per-tensor form compute them.
    edges = torch.arange(width + 1, dtype=torch.float64, device=device)[None, :] * bin_width[:, None]
    centres = (edges[:, :-1] + edges[:, 1:]) / 2
    # Used bins of the searched rows compacted to the left of each row, in bin order (padding:
    # centre 0, weight 0); ``most`` columns hold every searched row's, not necessarily the others'.
    if searched is not None and len(searched) < num_rows:
        is_searched = torch.zeros(num_rows, dtype=torch.bool, device=device)
        is_searched[torch.tensor(searched, dtype=torch.int64).to(device, non_blocking=True)] = True
        used = used & is_searched[:, None]
    position = torch.cumsum(used, dim=1) - 1
    row_ids = torch.arange(num_rows, dtype=torch.int64, device=device)[:, None]
    dest = torch.where(used, row_ids * most + position, num_rows * most).reshape(-1)  # the last slot takes the unused
    c_used = torch.zeros(num_rows * most + 1, dtype=torch.float64, device=device).scatter_(0, dest, centres.reshape(-1))
    w_used = torch.zeros(num_rows * most + 1, dtype=torch.float64, device=device).scatter_(0, dest, bins.reshape(-1))
    c_used = c_used[:-1].view(num_rows, most)
    w_used = w_used[:-1].view(num_rows, most)

    # Candidates of all searched rows in one flat list, histogram by histogram.
    searched_t = (torch.arange(num_rows, dtype=torch.int64, device=device) if searched is None
                  else torch.tensor(searched, dtype=torch.int64).to(device, non_blocking=True))
    column = start_bin + stride * pos
    candidates = torch.take(centres, searched_t[seg] * width + column)
    if limit is not None:  # absent candidates: NaN, scored inf by the kernel
        candidates = torch.where(column < limit[searched_t[seg]], candidates, torch.nan)
    errors = None
    if blocks is None:
        errors = mse_scores(c_used, w_used, used_count, searched_t[seg], candidates, qmax)
    if errors is None:  # no GPU kernel (or no candidate at all): the same scores by torch ops, block by block
        counts, used_host = blocks if blocks is not None else (None, None)
        if counts is None:  # the kernel failed to launch: size the blocks on the host
            counts = torch.bincount(seg, minlength=len(searched_t)).tolist()
            used_host = used_count[searched_t].tolist()
        errors = _block_scores(c_used, w_used, candidates, counts, used_host, searched_t.tolist(), qmax, device)
        if limit is not None:
            errors = torch.where(torch.isnan(candidates), torch.inf, errors)

    # First minimum per histogram (torch.argmin's pick), and whether rounding could move it.
    segments = len(searched_t)
    best = segment_min(errors, seg, segments)
    big = torch.iinfo(torch.int64).max
    first_min = torch.full((segments,), big, dtype=torch.int64, device=device).scatter_reduce_(
        0, seg, torch.where(errors == best[seg], pos, big), reduce="amin", include_self=True)
    is_first = pos == first_min[seg]
    terms_used = used_count.to(torch.float64)[searched_t][seg]
    bound = _SUM_BOUND * (terms_used + 1.0) * EPS * errors
    # Exact in any order: a sum of non-negative terms is 0 only if every term is; one term is itself.
    exact = (errors == 0) | (terms_used <= 1)
    first_bound = segment_pick(bound, is_first, seg, segments)
    first_exact = segment_pick(exact, is_first, seg, segments) > 0
    # An infinite score is never within a bound of a finite best (an absent candidate scores inf).
    close = ((~is_first) & torch.isfinite(errors) & ~(exact & first_exact[seg])
             & ((errors - best[seg]).abs() <= bound + first_bound[seg]))
    unsure = segment_any(close | torch.isnan(errors), seg, segments) | ~torch.isfinite(best)
    return segment_pick(candidates, is_first, seg, segments), unsure


def _block_scores(c_used: torch.Tensor, w_used: torch.Tensor, candidates: torch.Tensor, counts: List[int],
                  used_host: List[int], searched: List[int], qmax: float, device: torch.device) -> torch.Tensor:
    """Each candidate's weighted squared error by torch ops on ``[histograms, candidates, used bins]`` blocks."""
    errors = torch.empty(candidates.numel() + 1, dtype=torch.float64, device=device)  # last: a dump slot
    offsets = np.cumsum([0] + counts[:-1]).tolist()
    # Every chunk's indices built on the host and copied once: a copy per chunk from pageable
    # memory would wait for the chunks queued before it, serializing host and GPU.
    budget = chunk_budget(device) * (1 if device.type == "cpu" else MSE_CHUNK_FACTOR)
    chunks = _chunks(counts, used_host, budget)
    flat_parts, dest_parts, row_parts = [], [], []
    for group, first, size in chunks:
        # [histograms, candidates, used bins]: each histogram's bins broadcast over its candidates;
        # a histogram with fewer candidates repeats its last one (written to the dump slot).
        k = np.arange(size, dtype=np.int64)[None, :]
        limit = np.array([counts[g] - first - 1 for g in group], dtype=np.int64)[:, None]
        flat = np.array([offsets[g] + first for g in group], dtype=np.int64)[:, None] + np.minimum(k, limit)
        flat_parts.append(flat.reshape(-1))
        dest_parts.append(np.where(k <= limit, flat, candidates.numel()).reshape(-1))
        row_parts.append(np.array([searched[g] for g in group], dtype=np.int64))
    flat_all = torch.from_numpy(np.concatenate(flat_parts)).to(device, non_blocking=True)
    dest_all = torch.from_numpy(np.concatenate(dest_parts)).to(device, non_blocking=True)
    rows_all = torch.from_numpy(np.concatenate(row_parts)).to(device, non_blocking=True)
    at = row_at = 0
    for group, first, size in chunks:
        n = len(group) * size
        flat, dest, r = flat_all[at: at + n].view(len(group), size), dest_all[at: at + n], rows_all[row_at: row_at + len(group)]
        at, row_at = at + n, row_at + len(group)
        u = max(used_host[g] for g in group)
        c = c_used[:, :u].index_select(0, r)[:, None, :]
        w = w_used[:, :u].index_select(0, r)[:, None, :]
        scale = candidates[flat][:, :, None] / qmax
        # The per-tensor form's operations in its order, in place: fq = clamp(round(c / scale),
        # max=qmax) * scale (round half to even), then (c - fq) ** 2; the weighted sum as one
        # batched matrix-vector product (two passes over the block fewer than * w, then sum).
        squares = c / scale
        squares.round_().clamp_(max=qmax).mul_(scale)
        torch.sub(c, squares, out=squares).pow_(2)
        errors.scatter_(0, dest, torch.bmm(squares, w.transpose(1, 2)).reshape(-1))
        del c, w, squares
    return errors[:-1]


def _chunks(counts: List[int], used: List[int], budget: int) -> List[Tuple[List[int], int, int]]:
    """Groups histograms into ``[histograms, candidates, used bins]`` chunks within ``budget`` elements.

    Returns ``(histograms, first, size)`` triples: candidates ``first ..
    first + size - 1`` of each listed histogram (fewer where it has fewer). A
    histogram too large for one chunk gets chunks of its own, by candidate range.
    Histograms are taken widest first, so a chunk's width is its first one's.
    """
    out: List[Tuple[List[int], int, int]] = []
    group: List[int] = []
    size = 0
    for g in sorted(range(len(counts)), key=lambda g: (-used[g], -counts[g])):
        if counts[g] * used[g] > budget:
            step = max(1, budget // used[g])
            out += [([g], first, min(step, counts[g] - first)) for first in range(0, counts[g], step)]
            continue
        width = used[group[0]] if group else used[g]
        if group and (len(group) + 1) * max(size, counts[g]) * width > budget:
            out.append((group, 0, size))
            group, size = [], 0
        group.append(g)
        size = max(size, counts[g])
    if group:
        out.append((group, 0, size))
    return out
