"""Range-choosing algorithms: pure functions from :class:`HistogramStats` to amax.

Importing this package registers the built-in calibrators ``max``,
``percentile``, ``entropy`` and ``mse``, each with a batched form that
:func:`choose_many` uses to score all histograms of a model together.
"""
from .base import (
    BatchedCalibrator,
    Calibrator,
    HistogramBlock,
    HistogramStats,
    PendingChoice,
    UnknownCalibratorError,
    block_form_is_costly,
    get_batched_calibrator,
    get_block_calibrator,
    get_calibrator,
    list_calibrators,
    register_batched_calibrator,
    register_block_calibrator,
    register_calibrator,
)
from .many import BlockChoices, block_of, choose_many
from . import entropy, max, mse, percentile  # noqa: F401,E402  (registers them)
from . import entropy_many, mse_many, percentile_many  # noqa: F401,E402  (registers the batched forms)
from .choose import capped_ranges, choose_amax, choose_ranges  # noqa: E402

__all__ = [
    "BatchedCalibrator",
    "BlockChoices",
    "Calibrator",
    "HistogramBlock",
    "HistogramStats",
    "PendingChoice",
    "UnknownCalibratorError",
    "block_form_is_costly",
    "block_of",
    "capped_ranges",
    "choose_amax",
    "choose_many",
    "choose_ranges",
    "get_batched_calibrator",
    "get_block_calibrator",
    "get_calibrator",
    "list_calibrators",
    "register_batched_calibrator",
    "register_block_calibrator",
    "register_calibrator",
]
