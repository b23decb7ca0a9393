"""The pipeline's ``choose`` stage: statistics to ranges, pure (no model, no data).

Every calibrator's choice goes through :func:`quantlab.calibrators.choose_ranges` (batched
across tensors).
With a process group (every rank holding the same merged statistics), rank ``r``
chooses the ranges of tensors ``r, r + N, ...`` with every calibrator and one
all-gather gives all ranks every range.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch

from quantlab import distributed
from quantlab.calibrators import BlockChoices, block_form_is_costly, capped_ranges, choose_ranges, get_calibrator
from quantlab.pipeline.types import Ranges, Statistics

Calibrators = Union[str, Sequence[str], Mapping[str, Mapping[str, Any]]]


def calibrator_params(calibrators: Calibrators) -> Dict[str, Dict[str, Any]]:
    """``"entropy"``, ``["max", "mse"]`` or ``{"percentile": {"percentile": 99.9}}`` -> name -> params."""
    if isinstance(calibrators, str):
        return {calibrators.lower(): {}}
    if isinstance(calibrators, Mapping):
        return {str(name).lower(): dict(params or {}) for name, params in calibrators.items()}
    return {str(name).lower(): {} for name in calibrators}


def choose(statistics: Statistics, calibrator: str, params: Optional[Mapping[str, Any]] = None, *,
           group: Any = None) -> Ranges:
    """The ranges one calibrator chooses from ``statistics`` (see :func:`choose_all`)."""
    return choose_all(statistics, {calibrator: dict(params or {})}, group=group)[calibrator.lower()]


def choose_all(statistics: Statistics, calibrators: Calibrators, *, group: Any = None,
               extra: Sequence[torch.Tensor] = ()) -> Mapping[str, Ranges]:
    """The ranges every calibrator chooses from the same statistics.

    Args:
        statistics: From ``collect`` (or saved with a scales file).
        calibrators: Names, or name -> parameters.
        group: A process group: collective; the work is split by tensor over
            the ranks and every rank gets every range. A failure on one rank
            is raised on every rank.
        extra: Device tensors to read back with the statistics of a deferred pass
            (:class:`ChoicesBehindThePass`'s ``extra_values``); ignored otherwise.

    Returns:
        Calibrator name -> :class:`Ranges`, in the order given (behind a deferred
        pass, a :class:`ChoicesBehindThePass`: the costly calibrators' ranges are
        read back when first asked for).

    Raises:
        UnknownCalibratorError: for an unregistered name (before any work).
    """
    wanted = calibrator_params(calibrators)
    for name in wanted:
        get_calibrator(name)
    # num_bits is the statistics' own: the ordinary path rejects it as a parameter, so it decides such a call.
    if statistics.pending is not None and group is None and not any("num_bits" in p for p in wanted.values()):
        return ChoicesBehindThePass(statistics, wanted, extra)
    names = list(statistics.histograms)
    rank, size = distributed.group_rank(group), distributed.group_size(group)
    mine_names = names[rank::size]
    seconds = dict.fromkeys(wanted, 0.0)
    chosen: Dict[str, Dict[str, float]] = {}
    error: Optional[BaseException] = None
    try:
        for name, params in wanted.items():
            start = time.perf_counter()
            chosen[name] = choose_ranges(name, {n: statistics.histograms[n] for n in mine_names},
                                       num_bits=statistics.num_bits, params=params)
            seconds[name] += time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - under a group, re-raised on every rank below
        if group is None:
            raise
        error = exc
    if group is not None:
        start = time.perf_counter()
        parts = distributed.gather_results(error, chosen, "choosing the ranges", group)
        chosen = {name: {} for name in wanted}
        for part in parts:
            for name, amax in part.items():
                chosen[name].update(amax)
        shared = (time.perf_counter() - start) / max(1, len(wanted))
        seconds = {name: t + shared for name, t in seconds.items()}
    return {
        name: Ranges(calibrator=name, params=params, inputs={n: chosen[name][n] for n in names}, seconds=seconds[name])
        for name, params in wanted.items()
    }


class ChoicesBehindThePass(Mapping[str, Ranges]):
    """The ranges every calibrator chooses behind a deferred pass (``collect(..., defer=True)``).

    Every block form is enqueued behind the pass before anything waits for the
    device, so the host's work overlaps the pass's GPU work. Two read-backs:
    the statistics, the light calibrators' results and ``extra`` (e.g. the
    weights' ranges) as soon as the pass is done; the costly calibrators'
    (:func:`~quantlab.calibrators.block_form_is_costly`) when one of their
    ranges is first asked for, so a caller can finish the others on the host
    while the device still computes them (:attr:`ready` says which are in).
    The same ranges as :func:`choose_ranges` on the histograms, bit for bit.

    Args:
        statistics: A deferred pass's statistics (``pending`` set).
        wanted: Calibrator name -> parameters, in order.
        extra: Tensors (any shapes) read back with the first copy, end to end as one float32
            CPU tensor in :attr:`extra_values`; None there unless all are on the block's device.

    Raises:
        NonFiniteActivationError: a NaN/Inf reached a quantized layer during the pass.
    """

    def __init__(self, statistics: Statistics, wanted: Dict[str, Dict[str, Any]],
                 extra: Sequence[torch.Tensor] = ()) -> None:
        start = time.perf_counter()
        pending = statistics.pending
        assert pending is not None
        self._wanted = dict(wanted)
        self._statistics = statistics
        self._names = pending.names
        block = pending.flush.block
        costly = {name: params for name, params in wanted.items() if block_form_is_costly(name)}
        light = BlockChoices(block, {name: params for name, params in wanted.items() if name not in costly},
                             num_bits=statistics.num_bits)
        first = [torch.cat([pending.flush.scalars, light.values], dim=1)]
        extra = list(extra) if all(t.device == block.counts.device for t in extra) else []
        if extra:
            first.append(torch.cat([t.detach().reshape(-1).to(torch.float32) for t in extra]))
        copies, done = _copy_to_host(first)  # no wait yet: the costly forms go in behind it
        self._costly = BlockChoices(block, costly, num_bits=statistics.num_bits) if costly else None
        if done is not None:
            done.synchronize()  # the pass (and the light forms) are done; the costly ones still run
        read = copies[0].tolist()
        self.extra_values: Optional[torch.Tensor] = copies[1] if extra else None
        statistics.complete([row[:3] for row in read])  # raises a NaN/Inf the pass saw
        self._rows = [statistics.histograms.get(name) for name in self._names]
        self._ranges: Dict[str, Ranges] = {}
        # The wait for the pass is every calibrator's: each gets an even share of it.
        self._shared = (time.perf_counter() - start) / max(1, len(wanted))
        self._add(light.settle([row[3:] for row in read], self._rows), 0.0)

    @property
    def ready(self) -> List[str]:
        """The calibrators whose ranges are in, in the order wanted."""
        return [name for name in self._wanted if name in self._ranges]

    def __getitem__(self, name: str) -> Ranges:
        if name not in self._ranges and name in self._wanted and self._costly is not None:
            start = time.perf_counter()
            chosen = self._costly.settle(self._costly.values.tolist(), self._rows)  # waits for the costly forms
            self._costly = None
            self._add(chosen, time.perf_counter() - start)
        return self._ranges[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._wanted)

    def __len__(self) -> int:
        return len(self._wanted)

    def _add(self, chosen: Dict[str, List[float]], seconds: float) -> None:
        histograms = self._statistics.histograms
        for name, amaxes in chosen.items():
            # Every tensor the statistics hold, in their order (0.0 for one that saw only zeros), as choose_ranges.
            inputs = capped_ranges(histograms, dict(zip(self._names, amaxes)))
            self._ranges[name] = Ranges(calibrator=name, params=self._wanted[name], inputs=inputs,
                                        seconds=self._shared + seconds / max(1, len(chosen)))


def _copy_to_host(tensors: List[torch.Tensor]) -> "tuple[List[torch.Tensor], Optional[torch.cuda.Event]]":
    """Copies to the host without waiting (pinned memory, an event to wait on) from a CUDA device."""
    if not tensors[0].is_cuda:
        return [t.cpu() for t in tensors], None
    copies = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for copy, t in zip(copies, tensors):
        copy.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tensors[0].device))
    return copies, done
