"""quantlab: an INT8 quantization workbench for PyTorch models.

One verb quantizes, any registered calibrator chooses ranges from one statistics
pass, and the scales feed TensorRT (Q/DQ ONNX, calibration cache)::

    import quantlab as ql
    qmodel = ql.quantize(model, ql.int8_config(), forward_loop=lambda m: [m(x) for x, _ in loader])
    scales = ql.calibrate(qmodel, calibrator="entropy")
    scales.save("scales.json"); ql.load_scales(qmodel, "scales.json")
"""
from quantlab.api import (
    calibrate,
    collected_statistics,
    current_scales,
    get_config,
    load_scales,
    quantize,
    set_quantizer_amax,
)
from quantlab.attach import (
    QuantizerRef,
    is_quantized,
    iter_quantizers,
    quantization_disabled,
    remove_quantizers,
    set_mode,
    weight_quantizer,
)
from quantlab.calibrators import HistogramStats, get_calibrator, list_calibrators, register_calibrator
from quantlab.config import QuantConfig, QuantizerSpec, int8_config
from quantlab.errors import (
    CalibrationError,
    ConfigError,
    NonFiniteActivationError,
    NothingToQuantizeError,
    QuantlabError,
    ScalesFormatError,
    ScalesMismatchError,
)
from quantlab.functional import fake_quantize
from quantlab.registry import register_quantizable
from quantlab.scales import QuantizerScale, Scales
from quantlab.statistics import HistogramCollector
from quantlab.tensor_quantizer import QuantizerMode, Role, TensorQuantizer
from quantlab.pipeline import collect

__version__ = "0.1.0"


def collect_statistics(model, forward_loop, cuda_graphs: bool = True):
    """Runs one statistics pass (:func:`quantlab.pipeline.collect`); returns the batches each input saw."""
    return collect(model, forward_loop, cuda_graphs=cuda_graphs).batches


def load_scales_file(path) -> Scales:
    """Reads a scales file without a model (see :meth:`Scales.load`)."""
    return Scales.load(path)


__all__ = [name for name in dir() if not name.startswith("_")]
