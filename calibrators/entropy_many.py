"""The ``entropy`` calibrator over many histograms at once (same thresholds as :mod:`.entropy`).

The per-tensor calibrator screens every threshold with prefix sums, then
re-evaluates term by term every threshold that screens within ``tol`` of the
best, and takes the last minimum. Here the candidates of all histograms form
one flat list (no padding), screened together; the near set is taken with a
wider margin (``4 * tol``), so it holds the per-tensor near set, and its
thresholds are re-evaluated together with the per-tensor term-by-term
operations (rows of several histograms side by side, zero-padded on the right).

Counts are integers here (other histograms go to the per-tensor form), so every
count sum, level sum and clipped mass is exact and equal to the per-tensor
value; the element-wise operations are the same, in the same order. What may
differ is rounding in the two sums over non-integers (``q``'s total and the
sum of the KL terms) and the screening sums. The last minimum is kept only if
every other near threshold of its histogram scores farther from it than both
sums' error bounds allow (or both scores are exact in any order: integer
``q`` and at most one non-zero term), and if the winner screens within
``tol / 2`` of the best (so the per-tensor form re-evaluates it too).
Otherwise the per-tensor form decides.

On a GPU two kernels (:mod:`.entropy_cuda`) screen every candidate and score the near set
term by term with the same operations, the near set chosen on the device: nothing is read
back until the choice.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from . import entropy_cuda
from .base import HistogramBlock, HistogramStats, PendingChoice, register_batched_calibrator, register_block_calibrator
from .entropy import _EPS, _validate, _xlogx
from .many import (block_choice, chunk_budget, even_rows, integer_rows, pack_counts, ragged, segment_any, segment_min,
                   segment_pick, spans, split_trivial)

#: Near set: screened within this many ``tol`` of the best (the per-tensor form uses 1).
_NEAR = 4.0
#: The winner must screen within this many ``tol`` of the best.
_BAND = 0.5
#: Error bound of one term-by-term divergence against any other summation
#: order: ``_SUM_BOUND * eps * (i + 3) * (1 + sum |terms|)`` for threshold ``i``
#: (``q``'s total and the term sum over ``i`` bins, twice, with a factor 2 of margin).
_SUM_BOUND = 8.0


@register_batched_calibrator("entropy")
def entropy_many(
    stats: Sequence[HistogramStats], *, num_bits: int = 8, start_bin: int = 128, stride: int = 1
) -> List[Optional[float]]:
    """:func:`~.entropy.entropy_calibrator` for every histogram at once: one read-back on a GPU
    with the kernels of :mod:`.entropy_cuda`, three with torch ops.

    Raises:
        ValueError: For ``num_bits < 2``, ``start_bin < 1`` or ``stride < 1``.
    """
    _validate(num_bits, start_bin, stride)
    out, rows = split_trivial(stats)
    if not rows:
        return out
    levels = 1 << (num_bits - 1)
    values, host = _enqueue(prepare_rows([stats[t] for t in rows], levels, start_bin, stride), levels)
    return _settle(out, stats, rows, values.tolist() if host is None else host, start_bin, stride)


@register_block_calibrator("entropy", costly=True)  # a few ms of GPU work for a model
def entropy_block(block: HistogramBlock, *, num_bits: int = 8, start_bin: int = 128, stride: int = 1) -> PendingChoice:
    """:func:`entropy_many` on a :class:`HistogramBlock`: with the kernels, device work only.

    Every row gets the candidates ``start_bin, start_bin + stride, ...`` up to the
    block's width; those past the row's own bins screen as ``inf`` (never a
    minimum, never near: as if absent), so each row's choice is its own.
    Without the kernels the torch-op form runs here, reading back as it does.
    """
    _validate(num_bits, start_bin, stride)
    levels = 1 << (num_bits - 1)
    values, host = _enqueue(prepare_block(block, levels, start_bin, stride), levels)
    return block_choice(values, lambda out, stats, rows, read: _settle(out, stats, rows, read, start_bin, stride), host)


def _settle(out: List[Optional[float]], stats: Sequence[HistogramStats], rows: List[int], read: List[List[float]],
            start_bin: int, stride: int) -> List[Optional[float]]:
    """The answers from each row's five flags, its last minimum and its doubt (see :func:`_enqueue`)."""
    _settle_early(out, stats, rows, [h[:5] for h in read], start_bin, stride)
    _settle_searched(out, stats, rows, [h[:5] for h in read], [h[5:] for h in read])
    return out


def _enqueue(p: "Rows", levels: int) -> "tuple[torch.Tensor, Optional[List[List[float]]]]":
    """Every row's flags (decided, non-zero, searchable, all impossible, unscreenable), last minimum and doubt.

    Returns:
        ``(values, None)`` with the kernels: a ``[rows, 7]`` tensor, nothing read back;
        else ``(empty, the same rows as lists)``, read back on the way (the torch-op form needs
        the near set's size on the host).
    """
    raw, bins, cum_b, total, seg, thresholds, tol = p.raw, p.bins, p.cum_b, p.total, p.seg, p.thresholds, p.tol
    num_rows, width = raw.shape
    screened = entropy_cuda.screen(bins, cum_b, p.cum_n, p.cum_blogb, total, p.log_total, seg, thresholds, levels)
    if screened is None:
        screened = _screen(bins, cum_b, p.cum_n, p.cum_blogb, total, p.log_total, seg, thresholds, levels)
    if p.valid is not None:  # a block's candidates past a row's own bins: absent
        screened = torch.where(p.valid, screened, torch.inf)

    decided = integer_rows(raw)
    nonzero = (raw != 0).any(dim=1)
    searchable = decided & nonzero
    if width > 1:  # the per-tensor form needs a positive count past bin 0 (rows of one bin excepted)
        searchable &= ~p.several | (raw[:, 1:] > 0).any(dim=1)
    best = segment_min(screened, seg, num_rows)
    unscreenable = torch.isnan(best) | segment_any(torch.isnan(screened), seg, num_rows)
    near = (screened <= best[seg] + _NEAR * tol[seg]) & (searchable & torch.isfinite(best))[seg]
    flags = torch.stack([decided, nonzero, searchable, torch.isinf(best), unscreenable], dim=1).to(torch.int64)

    scored = entropy_cuda.exact(bins, cum_b, p.cum_n, total, seg, thresholds, near, levels, _SUM_BOUND * _EPS)
    if scored is not None:  # every candidate scored on the device (inf outside the near set)
        last, unsure = _last_minimum(*scored, screened, seg, thresholds, best, tol, num_rows)
        return torch.cat([flags, last[:, None], unsure.to(torch.int64)[:, None]], dim=1).to(torch.float64), None

    near_index = torch.nonzero(near)[:, 0]  # read-back 1
    near_seg = seg[near_index]
    near_thr = thresholds[near_index]
    host = torch.cat([flags.reshape(-1), near_thr]).tolist()  # read-back 2
    flags_host = [host[5 * r: 5 * r + 5] for r in range(num_rows)]
    widths = host[5 * num_rows:]
    chosen: List[List[float]] = [[-1, 1]] * num_rows  # no near candidate: nothing searched
    if widths:
        divergence, bound, exact = _exact(bins, cum_b, total, near_seg, near_thr, widths, levels)
        last, unsure = _last_minimum(divergence, bound, exact, screened[near_index], near_seg, near_thr, best, tol, num_rows)
        chosen = torch.stack([last, unsure.to(torch.int64)], dim=1).tolist()  # read-back 3
    return raw.new_empty(num_rows, 0), [f + c for f, c in zip(flags_host, chosen)]


class Rows(NamedTuple):
    """The histograms packed for scoring, and every candidate threshold of every row."""

    raw: torch.Tensor  #: ``[rows, width]`` float64 counts, zero-padded
    bins: torch.Tensor  #: the same with the reference's bin-0 quirk
    several: torch.Tensor  #: rows of more than one bin
    cum_b: torch.Tensor  #: ``[rows, width + 1]`` prefix sums of ``bins`` (exact: integers below 2**53)
    cum_n: torch.Tensor  #: prefix counts of non-empty bins
    cum_blogb: torch.Tensor  #: prefix sums of ``b log b``
    total: torch.Tensor  #: ``[rows]`` count totals
    log_total: torch.Tensor
    tol: torch.Tensor  #: the per-tensor screening tolerance, row by row
    seg: torch.Tensor  #: ``[candidates]`` row of each candidate
    thresholds: torch.Tensor  #: ``[candidates]`` its threshold bin
    valid: Optional[torch.Tensor] = None  #: ``[candidates]`` within its row's bins (None: all are)


def prepare_rows(stats: Sequence[HistogramStats], levels: int, start_bin: int, stride: int) -> Rows:
    """Packs histograms (1-D counts on one device) and lists their candidates: device work only, no read-back."""
    raw = pack_counts([s.counts for s in stats])
    device = raw.device
    num_bins = [s.num_bins for s in stats]
    several = torch.tensor([n > 1 for n in num_bins], dtype=torch.bool).to(device, non_blocking=True)
    bins_and_levels = torch.tensor([n + levels for n in num_bins], dtype=torch.float64).to(device, non_blocking=True)
    seg, pos = ragged([len(range(start_bin, n + 1, stride)) for n in num_bins], device)
    return _rows(raw, several, bins_and_levels, seg, start_bin + stride * pos, None)


def prepare_block(block: HistogramBlock, levels: int, start_bin: int, stride: int) -> Rows:
    """:func:`prepare_rows` for a block: every row gets the candidates up to the block's width,
    those past its own bins marked invalid (sizes stay on the device)."""
    raw = block.counts
    num_rows, width = raw.shape
    seg, pos = even_rows(num_rows, len(range(start_bin, width + 1, stride)), raw.device)
    thresholds = start_bin + stride * pos
    valid = thresholds <= block.num_bins[seg]
    return _rows(raw, block.num_bins > 1, (block.num_bins + levels).to(torch.float64), seg, thresholds, valid)


def _rows(raw: torch.Tensor, several: torch.Tensor, bins_and_levels: torch.Tensor, seg: torch.Tensor,
          thresholds: torch.Tensor, valid: Optional[torch.Tensor]) -> Rows:
    """The prefix sums, totals and tolerances of packed rows (``several``: rows of more than one bin)."""
    num_rows, width = raw.shape
    device = raw.device
    # The reference's bin-0 quirk (bins[0] = bins[1]) where a row has more than one bin.
    bins = raw.clone()
    if width > 1:
        bins[:, 0] = torch.where(several, raw[:, 1], raw[:, 0])
    zero = torch.zeros(num_rows, 1, dtype=torch.float64, device=device)
    cum_b = torch.cat([zero, torch.cumsum(bins, dim=1)], dim=1)
    cum_n = torch.cat([zero, torch.cumsum((bins > 0).to(torch.float64), dim=1)], dim=1)
    cum_blogb = torch.cat([zero, torch.cumsum(_xlogx(bins), dim=1)], dim=1)
    total = cum_b[:, -1].contiguous()
    log_total = torch.log(total)
    log_abs_max = torch.where(bins > 0, torch.log(bins).abs(), 0.0).amax(dim=1)
    tol = 64.0 * _EPS * bins_and_levels * (log_abs_max + log_total.abs() + 1.0)
    return Rows(raw, bins, several, cum_b, cum_n, cum_blogb, total, log_total, tol, seg, thresholds, valid)


def _settle_early(out: List[Optional[float]], stats: Sequence[HistogramStats], rows: List[int],
                  flags: List[List[int]], start_bin: int, stride: int) -> None:
    """The answers that need no divergence: empty rows, rows too coarse to search, every candidate impossible."""
    for r, (ok, any_nonzero, search, all_impossible, nan) in enumerate(flags):
        t, s = rows[r], stats[rows[r]]
        if not ok:
            continue  # not integer counts below 2**53: the per-tensor form decides
        if not any_nonzero:
            out[t] = 0.0
        elif s.num_bins < start_bin or not search:
            out[t] = float(s.amax)  # too few bins, or every count in bin 0
        elif nan:
            continue  # a NaN score (not seen on real counts): the per-tensor form decides
        elif all_impossible:
            # Every candidate scores inf: the last threshold wins (last argmin of all-inf).
            out[t] = range(start_bin, s.num_bins + 1, stride)[-1] * float(s.bin_width)


def _settle_searched(out: List[Optional[float]], stats: Sequence[HistogramStats], rows: List[int],
                     flags: List[List[int]], chosen: List[List[int]]) -> None:
    """The searched rows' last minimum where rounding cannot have moved it (``chosen``: threshold, doubt)."""
    for r, (threshold, doubt) in enumerate(chosen):
        t = rows[r]
        ok, _, search, all_impossible, nan = flags[r]
        if out[t] is None and ok and search and not all_impossible and not nan and threshold > 0 and not doubt:
            out[t] = int(threshold) * float(stats[t].bin_width)


def _last_minimum(divergence, bound, exact, screened, seg, thresholds, best, tol, num_rows):
    """Each row's last minimum of the term-by-term scores, and whether rounding or the near set could move it.

    ``divergence``, ``bound``, ``exact``, ``screened``, ``seg`` and ``thresholds`` describe the
    scored candidates (the near set, or every candidate with ``inf`` outside it: an infinite
    score is never a row's finite minimum nor a close rival, and an all-infinite row is unsure).

    Returns:
        ``(last, unsure)``: the threshold (``-1`` for a row without scores) and a flag per row.
    """
    device = divergence.device
    low = segment_min(divergence, seg, num_rows)
    last = torch.full((num_rows,), -1, dtype=torch.int64, device=device).scatter_reduce_(
        0, seg, torch.where(divergence == low[seg], thresholds, -1), reduce="amax", include_self=True)
    is_last = thresholds == last[seg]
    last_bound = segment_pick(bound, is_last, seg, num_rows)
    last_exact = segment_pick(exact, is_last, seg, num_rows) > 0
    last_screened = segment_pick(screened, is_last, seg, num_rows)
    close = ((~is_last) & torch.isfinite(divergence) & ~(exact & last_exact[seg])
             & ((divergence - low[seg]).abs() <= bound + last_bound[seg]))
    unsure = (segment_any(close | torch.isnan(divergence), seg, num_rows) | ~torch.isfinite(low)
              | (last_screened > best + _BAND * tol))
    return last, unsure


def _screen(bins, cum_b, cum_n, cum_blogb, total, log_total, seg, thresholds, levels) -> torch.Tensor:
    """The per-tensor screening formula for every (row, threshold) candidate, chunk by chunk."""
    device = bins.device
    stride_b, stride_c = bins.shape[1], cum_b.shape[1]
    j = torch.arange(levels + 1, dtype=torch.int64, device=device)[None, :]
    out = torch.empty(thresholds.numel(), dtype=torch.float64, device=device)
    rows_per_chunk = max(1, chunk_budget(device) // (levels + 1))
    for lo in range(0, thresholds.numel(), rows_per_chunk):
        hi = min(lo + rows_per_chunk, thresholds.numel())
        i, r = thresholds[lo:hi], seg[lo:hi]
        base_c = (r * stride_c)[:, None]
        # Level j holds bins ceil(j*i/L) .. ceil((j+1)*i/L) - 1 (contiguous).
        bounds = torch.div(j * i[:, None] + (levels - 1), levels, rounding_mode="floor") + base_c
        b_at, n_at = torch.take(cum_b, bounds), torch.take(cum_n, bounds)
        level_sum = b_at[:, 1:] - b_at[:, :-1]
        level_cnt = n_at[:, 1:] - n_at[:, :-1]
        has = level_cnt > 0
        log_mean = torch.where(has, torch.log(level_sum / level_cnt.clamp_min(1.0)), 0.0)
        s_log_m = (torch.where(has, level_sum, 0.0) * log_mean).sum(dim=1)
        kept = torch.take(cum_b, r * stride_c + i)
        row_total = total[r]
        clipped = row_total - kept  # exact: the per-tensor suffix sum
        b_last = torch.take(bins, r * stride_b + i - 1)
        last_level = torch.div((i - 1) * levels, i, rounding_mode="floor")
        log_m_last = log_mean.gather(1, last_level[:, None])[:, 0]
        corr = torch.where(clipped > 0, _xlogx(b_last + clipped) - _xlogx(b_last) - clipped * log_m_last, 0.0)
        div = (torch.take(cum_blogb, r * stride_c + i) - s_log_m + corr) / row_total + torch.log(kept) - log_total[r]
        impossible = (kept <= 0) | ((clipped > 0) & (b_last <= 0))
        out[lo:hi] = torch.where(impossible, torch.inf, div)
    return out


def _exact(bins, cum_b, total, seg, thresholds, widths, levels):
    """Term-by-term divergences (the per-tensor operations), their error bounds and exactness.

    ``widths`` is ``thresholds`` on the host (it sizes the chunks).
    """
    device = bins.device
    order = np.argsort(np.asarray(widths, dtype=np.int64), kind="stable")
    order_t = torch.from_numpy(order).to(device, non_blocking=True)
    sorted_widths = [widths[k] for k in order]
    divergence = torch.empty(len(widths), dtype=torch.float64, device=device)
    bound = torch.empty_like(divergence)
    exact = torch.empty(len(widths), dtype=torch.bool, device=device)
    stride_c = cum_b.shape[1]
    for lo, hi in spans(sorted_widths, chunk_budget(device)):
        width = sorted_widths[hi - 1]
        idx = order_t[lo:hi]
        i, r = thresholds[idx][:, None], seg[idx]
        k = torch.arange(width, dtype=torch.int64, device=device)[None, :]
        inside = k < i
        b = bins[:, :width].index_select(0, r)
        level = torch.div(k * levels, i, rounding_mode="floor")
        level = torch.where(inside, level, levels)
        kept = (inside & (b > 0)).to(torch.float64)
        level_sum = torch.zeros(hi - lo, levels + 1, dtype=torch.float64, device=device)
        level_sum.scatter_add_(1, level, b * kept)  # exact: integer sums
        level_cnt = torch.zeros_like(level_sum).scatter_add_(1, level, kept)
        level_mean = level_sum.div_(level_cnt.clamp_min_(1.0))
        q = torch.gather(level_mean, 1, level).mul_(kept)
        del level, kept, level_sum, level_cnt, level_mean
        q_integer = (q == torch.floor(q)).all(dim=1)  # then q's total is exact in any order
        p = torch.where(inside, b, 0.0)
        p.scatter_add_(1, i - 1, (total[r] - torch.take(cum_b, r * stride_c + i[:, 0]))[:, None])
        del inside, b
        q_total = q.sum(dim=1)
        p.div_(p.sum(dim=1, keepdim=True))
        q.div_(q_total[:, None])
        term = torch.where(p > 0, p * torch.log(p / q), 0.0)
        divergence[idx] = torch.where(q_total > 0, term.sum(dim=1), torch.inf)
        bound[idx] = _SUM_BOUND * _EPS * (i[:, 0].to(torch.float64) + 3.0) * (1.0 + term.abs().sum(dim=1))
        exact[idx] = q_integer & ((term != 0).sum(dim=1) <= 1)
        del p, q, term
    return divergence, bound, exact
