"""A saved mixed-precision scales file loads into a fresh model (its config excludes the float layers)."""
import copy

import pytest

import quantlab as ql
from quantlab.errors import ScalesMismatchError
from quantlab.jobs.autoprecision import mixed_scales
from tests.qat.models import tiny_cnn


def _scales():
    import torch

    model = tiny_cnn().eval()
    batch = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(batch))
    return model, ql.current_scales(model, calibrator="max")


def test_mixed_config_loads_into_a_fresh_model_with_the_layer_in_float(tmp_path):
    model, scales = _scales()
    layer = scales.entries[0].module
    path = mixed_scales(scales, [layer]).save(tmp_path / "mixed.json")
    fresh = ql.load_scales(tiny_cnn().eval(), str(path))
    from quantlab.attach import iter_quantizers

    quantized = {ref.module_name for ref in iter_quantizers(fresh)}
    assert layer not in quantized and quantized == {e.module for e in scales.entries} - {layer}


def test_a_float_layer_the_model_does_not_have_is_still_refused(tmp_path):
    _, scales = _scales()
    wrong = copy.deepcopy(mixed_scales(scales, [scales.entries[0].module]))
    wrong.float_layers = ["no.such.layer"]
    with pytest.raises(ScalesMismatchError, match="float layer 'no.such.layer' is not a quantized layer"):
        ql.load_scales(tiny_cnn().eval(), wrong)
