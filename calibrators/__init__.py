"""Range-choosing algorithms: pure functions from :class:`HistogramStats` to amax.

Importing this package registers the built-in calibrators ``max``,
``percentile``, ``entropy`` and ``mse``.
"""
from .base import (
    Calibrator,
    HistogramStats,
    UnknownCalibratorError,
    get_calibrator,
    list_calibrators,
    register_calibrator,
)
from . import entropy, max, mse, percentile  # noqa: F401,E402  (registers them)
from .choose import choose_amax, choose_many  # noqa: E402

__all__ = [
    "Calibrator",
    "HistogramStats",
    "UnknownCalibratorError",
    "choose_amax",
    "choose_many",
    "get_calibrator",
    "list_calibrators",
    "register_calibrator",
]
