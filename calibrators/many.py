"""One calibrator over many histograms: :func:`choose_many` and the helpers of the batched forms.

On a GPU the per-tensor calibrators are launch-bound: a few dozen small kernels
and several read-backs per histogram, for every tensor of the model. A batched
form packs all histograms of one device into one zero-padded matrix and scores
every candidate range of every tensor together, so a whole model costs a few
launches per chunk of work and two or three read-backs in all.

The batched forms must return the per-tensor calibrator's amax bit for bit.
Where that calibrator sums floating-point values whose order could change its
choice (the KL and MSE scores), the batched form sums in its own order and
proves the choice cannot depend on it: every other candidate must score
farther from the winner than both sums' rounding-error bounds allow, unless
both scores are exact in any order. Histograms it cannot settle so are left to
the per-tensor calibrator (``None``), as are histograms whose counts are not
non-negative integers below ``2**53`` (only then are the counts' own sums
exact in every order).
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import HistogramBlock, HistogramStats, PendingChoice, get_batched_calibrator, get_block_calibrator, get_calibrator

#: Elements of one ``[rows, columns]`` matrix per chunk of a batched form. On
#: accelerators 8 Mi elements (64 MB in float64; a chunk keeps a handful alive)
#: keep launches few for a whole model; on CPUs 64 Ki elements keep a chunk in
#: cache, as the per-tensor calibrators do.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 23
CPU_CHUNK_ELEMENTS = 1 << 16

#: Sums of non-negative integers below this are exact in float64, in any order.
EXACT_INTEGER_LIMIT = 2.0**53

EPS = torch.finfo(torch.float64).eps


def chunk_budget(device: torch.device) -> int:
    """Elements of one chunk matrix on ``device``."""
    return CPU_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def choose_many(name: str, stats: Sequence[HistogramStats], num_bits: int = 8, **params: Any) -> List[float]:
    """Runs calibrator ``name`` on every histogram; the same amaxes as calling it once per histogram.

    Histograms are grouped by device and handed to the calibrator's batched
    form where it has one; whatever that leaves undecided (and everything, for
    calibrators without a batched form) goes through the per-tensor calibrator.

    Args:
        name: A registered calibrator.
        stats: The histograms (any devices, any lengths).
        num_bits: Bit width, the same for all.
        **params: The calibrator's parameters.

    Returns:
        One amax per histogram, in order, as Python floats.

    Raises:
        UnknownCalibratorError: For an unregistered name.
        ValueError: For parameters the calibrator rejects.
    """
    per_tensor = get_calibrator(name)
    stats = list(stats)
    out: List[Optional[float]] = [None] * len(stats)
    batched = get_batched_calibrator(name)
    if batched is not None and stats:
        by_device: Dict[torch.device, List[int]] = {}
        for index, s in enumerate(stats):
            by_device.setdefault(s.counts.device, []).append(index)
        for indices in by_device.values():
            try:
                chosen = batched([stats[i] for i in indices], num_bits=num_bits, **params)
            except TypeError:  # parameters its signature lacks: raise the per-tensor form's own error
                per_tensor(stats[indices[0]], num_bits=num_bits, **params)
                raise
            for index, amax in zip(indices, chosen):
                out[index] = amax
    return decide_rest(name, stats, out, num_bits, params)


def decide_rest(name: str, stats: Sequence[HistogramStats], answers: Sequence[Optional[float]], num_bits: int,
                params: Mapping[str, Any]) -> List[float]:
    """``answers`` as floats, the per-tensor calibrator deciding where they are None."""
    per_tensor = get_calibrator(name)
    return [float(per_tensor(s, num_bits=num_bits, **params)) if a is None else float(a) for s, a in zip(stats, answers)]


class BlockChoices:
    """Calibrators' block forms enqueued on one :class:`HistogramBlock`: one read-back serves them all.

    Construct (device work only, nothing read back), read :attr:`values` back
    with whatever else the caller needs from the device, then :meth:`settle`
    with the rows and the histograms they describe: the same amaxes as
    :func:`choose_many` on those histograms, bit for bit. Calibrators without
    a block form run in :meth:`settle`, on the histograms.

    Args:
        block: The histograms, sizes on the device.
        calibrators: Name -> parameters.
        num_bits: Bit width, the same for all.

    Raises:
        UnknownCalibratorError: For an unregistered name.
        ValueError / TypeError: For parameters a calibrator rejects (as the per-tensor form raises them).
    """

    def __init__(self, block: HistogramBlock, calibrators: Mapping[str, Mapping[str, Any]], num_bits: int = 8) -> None:
        # name -> (bit width, other parameters): a calibrator's own num_bits overrides the shared one
        self.calibrators: Dict[str, Tuple[int, Dict[str, Any]]] = {}
        for name, params in calibrators.items():
            params = dict(params)
            self.calibrators[name.lower()] = (int(params.pop("num_bits", num_bits)), params)
        self.rows = block.rows
        self._pending: Dict[str, PendingChoice] = {}
        for name, (bits, params) in self.calibrators.items():
            per_tensor = get_calibrator(name)
            form = get_block_calibrator(name)
            if form is None:
                continue
            try:
                self._pending[name] = form(block, num_bits=bits, **params)
            except TypeError:  # parameters its signature lacks: raise the per-tensor form's own error
                per_tensor(HistogramStats(torch.zeros(1, dtype=torch.int64), 1.0, 0.0), num_bits=bits, **params)
                raise
        self._columns: Dict[str, Tuple[int, int]] = {}  # name -> its columns of values
        start = 0
        for name, pending in self._pending.items():
            end = start + int(pending.values.shape[1])
            self._columns[name], start = (start, end), end
        device = block.counts.device
        self.values = (torch.cat([p.values for p in self._pending.values()], dim=1) if self._pending
                       else torch.zeros(self.rows, 0, dtype=torch.float64, device=device))

    def settle(self, read: Sequence[Sequence[float]], stats: Sequence[Optional[HistogramStats]]) -> Dict[str, List[float]]:
        """Every calibrator's amax per row (0.0 where ``stats`` is None: nothing non-zero seen).

        Args:
            read: :attr:`values` as Python lists, row by row.
            stats: The histogram of each row.
        """
        # A row without statistics is never shown to a calibrator (as choose_ranges never does): a
        # placeholder without bins stands in for the block forms' settle, and its answer is 0.0.
        empty = HistogramStats(torch.zeros(0, dtype=torch.int64), 1.0, 0.0)
        filled = [empty if s is None else s for s in stats]
        seen = [r for r, s in enumerate(stats) if s is not None]
        out: Dict[str, List[float]] = {}
        for name, (bits, params) in self.calibrators.items():
            pending = self._pending.get(name)
            answers: List[Optional[float]] = [None] * len(filled)
            if pending is None:
                for r, amax in zip(seen, choose_many(name, [filled[r] for r in seen], num_bits=bits, **params)):
                    answers[r] = amax
            else:
                lo, hi = self._columns[name]
                answers = pending.settle([list(row[lo:hi]) for row in read], filled)
            decided = decide_rest(name, [filled[r] for r in seen], [answers[r] for r in seen], bits, params)
            out[name] = [0.0] * len(filled)
            for r, amax in zip(seen, decided):
                out[name][r] = amax
        return out


def block_choice(values: torch.Tensor, finish: Any, read_already: Optional[List[List[Any]]] = None) -> PendingChoice:
    """A block form's :class:`PendingChoice`: ``values`` to read back (or the rows ``read_already``, where
    the form had to read on the way) and ``finish(out, stats, rows, read)``, the batched form's own
    settling of its non-trivial ``rows`` (:func:`split_trivial`) from their rows of ``read``."""

    def settle(read: List[List[float]], stats: Sequence[HistogramStats]) -> List[Optional[float]]:
        out, rows = split_trivial(stats)
        every = read if read_already is None else read_already
        return finish(out, stats, rows, [every[t] for t in rows])

    return PendingChoice(values, settle)


def even_rows(num_rows: int, per_row: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`ragged` for rows of ``per_row`` elements each, built on the device (no copy at all)."""
    flat = torch.arange(num_rows * per_row, dtype=torch.int64, device=device)
    row = torch.div(flat, max(1, per_row), rounding_mode="floor")
    return row, flat - row * per_row


def block_of(stats: Sequence[HistogramStats], width: Optional[int] = None) -> HistogramBlock:
    """Histograms (1-D counts on one device) as a :class:`HistogramBlock`, zero-padded to ``width`` columns."""
    counts = pack_counts([s.counts for s in stats])
    device = counts.device
    width = max(1, counts.shape[1], width or 0)  # at least one column: a block's rows are never empty
    if width > counts.shape[1]:
        counts = torch.nn.functional.pad(counts, (0, width - counts.shape[1]))
    num_bins = torch.tensor([s.num_bins for s in stats], dtype=torch.int64).to(device, non_blocking=True)
    bin_width = torch.tensor([float(s.bin_width) for s in stats], dtype=torch.float64).to(device, non_blocking=True)
    return HistogramBlock(counts, num_bins, bin_width)


def split_trivial(stats: Sequence[HistogramStats]) -> Tuple[List[Optional[float]], List[int]]:
    """The answers every histogram calibrator gives without reading counts.

    Returns:
        ``(out, rows)``: ``out[t]`` is ``0.0`` where ``amax <= 0`` or there are
        no bins, else ``None``; ``rows`` lists the histograms with 1-D counts that
        need device work (others stay ``None``: the per-tensor calibrator decides).
    """
    out: List[Optional[float]] = [None] * len(stats)
    rows = []
    for index, s in enumerate(stats):
        if float(s.amax) <= 0.0 or s.num_bins == 0:
            out[index] = 0.0
        elif s.counts.dim() == 1:
            rows.append(index)
    return out, rows


def ragged(lengths: Sequence[int], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row index and position within the row of every element of ragged rows, on ``device``.

    ``lengths[r]`` elements belong to row ``r``; the result has ``sum(lengths)``
    entries, row by row. Built on the device from one small copy (no read-back):
    a marker at each row's start, counted up by a cumsum.
    """
    # Host-to-device copies are non_blocking throughout the batched forms: from pageable memory
    # the driver stages the bytes at once, and a blocking copy would wait for all queued GPU work.
    starts = np.cumsum([0] + list(lengths[:-1]), dtype=np.int64)
    total = int(sum(lengths))
    starts_t = torch.from_numpy(starts).to(device, non_blocking=True)
    inside = torch.from_numpy(starts[starts < total]).to(device, non_blocking=True)  # empty trailing rows start past the end
    markers = torch.zeros(total, dtype=torch.int64, device=device)
    markers.scatter_add_(0, inside, torch.ones_like(inside))  # empty rows add their marker to the next row's
    row = torch.cumsum(markers, 0) - 1
    return row, torch.arange(total, dtype=torch.int64, device=device) - starts_t[row]


#: The last packed matrix and what it was packed from: the calibrators of one run pack the same
#: histograms (``(id, version)`` of each counts tensor, weak references to confirm them).
_LAST_PACKED: List[Any] = [None]


def pack_counts(counts: Sequence[torch.Tensor], *, row_copies: Optional[bool] = None) -> torch.Tensor:
    """The histograms as one float64 ``[rows, max_bins]`` matrix, zero-padded on the right.

    Each value is converted exactly as ``counts.to(torch.float64)`` converts it
    (counts of one dtype are concatenated before the conversion, never through
    another dtype). Packing the very same tensors again (unchanged) returns the
    matrix packed before: callers read it and never modify it.

    Args:
        counts: 1-D histograms, all on one device.
        row_copies: Copy row by row (default on the CPU, where there are no
            launches to save) rather than with one index copy per dtype.
    """
    if any(c.is_inference() for c in counts):  # no version counter: a change in place would go unseen
        return _pack(counts, row_copies)
    device = counts[0].device
    # The stream too: the matrix is ready on the stream that packed it, not necessarily on another.
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (tuple((id(c), c._version) for c in counts), row_copies, stream)
    last = _LAST_PACKED[0]
    if last is not None and last[0] == key and all(ref() is c for ref, c in zip(last[1], counts)):
        return last[2]
    packed = _pack(counts, row_copies)
    _LAST_PACKED[0] = (key, [weakref.ref(c) for c in counts], packed)
    return packed


def _flat(c: torch.Tensor) -> torch.Tensor:
    """``c`` as a 1-D tensor without autograd: itself where it is one already (no op to dispatch)."""
    if c.requires_grad:
        c = c.detach()
    return c if c.dim() == 1 else c.reshape(-1)


def _pack(counts: Sequence[torch.Tensor], row_copies: Optional[bool]) -> torch.Tensor:
    device = counts[0].device
    lengths = [int(c.numel()) for c in counts]
    width = max(lengths)
    if len(set(lengths)) == 1 and len({c.dtype for c in counts}) == 1:
        return torch.stack([_flat(c) for c in counts]).to(torch.float64)
    if row_copies if row_copies is not None else device.type == "cpu":
        out = torch.zeros(len(counts), width, dtype=torch.float64, device=device)
        for row, (c, n) in enumerate(zip(counts, lengths)):
            out[row, :n] = _flat(c)
        return out
    out = torch.zeros(len(counts) * width, dtype=torch.float64, device=device)
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for row, c in enumerate(counts):
        by_dtype.setdefault(c.dtype, []).append(row)
    for rows in by_dtype.values():
        flat = torch.cat([_flat(counts[r]) for r in rows]).to(torch.float64)
        row, position = ragged([lengths[r] for r in rows], device)
        row_ids = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        out.index_copy_(0, row_ids[row] * width + position, flat)
    return out.view(len(counts), width)


def integer_rows(bins: torch.Tensor) -> torch.Tensor:
    """Rows of finite non-negative integers whose sum is below ``2**53``: every partial sum is exact.

    A sum reaching ``2**53`` computes as ``>= 2**53`` in any order (each
    partial sum below it is exact; rounding is monotone), so the test is exact.
    """
    ok = (torch.isfinite(bins) & (bins >= 0) & (bins == torch.floor(bins))).all(dim=1)
    return ok & (bins.sum(dim=1) < EXACT_INTEGER_LIMIT)


def spans(columns: Sequence[int], budget: int) -> List[Tuple[int, int]]:
    """Splits ordered rows into ``[start, end)`` chunks of at most ``budget`` elements.

    A chunk of rows ``start..end-1`` costs ``(end - start) * max(columns[start:end])``
    elements; ``columns`` must be monotone (ascending or descending), so the
    widest row of a chunk is one of its ends. Every chunk holds at least one
    row; the Python loop runs once per chunk, never once per row.
    """
    out = []
    n = len(columns)
    start = 0
    while start < n:
        lo, hi = start + 1, n  # the largest fitting end lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (mid - start) * max(columns[start], columns[mid - 1]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        out.append((start, lo))
        start = lo
    return out


def segment_min(values: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
    """Minimum of ``values`` per segment (``inf`` for an empty one); exact in any order."""
    out = torch.full((segments,), torch.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, segment, values, reduce="amin", include_self=True)


def segment_pick(values: torch.Tensor, chosen: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
    """Per segment, ``values`` at its one ``chosen`` element (0 where none): a sum of one term and zeros."""
    out = torch.zeros(segments, dtype=torch.float64, device=values.device)
    return out.scatter_add_(0, segment, torch.where(chosen, values.to(torch.float64), 0.0))


def segment_any(flags: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
    """Whether any flag of each segment is set."""
    out = torch.zeros(segments, dtype=torch.float64, device=flags.device)
    return out.scatter_add_(0, segment, flags.to(torch.float64)) > 0
