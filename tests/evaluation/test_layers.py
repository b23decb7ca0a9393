"""Per-layer SQNR/cosine in one pass: the planted layer stands out; identical models give inf dB."""
import copy
import math

from quantlab.evaluation.layers import layer_errors
from quantlab.ptq import run_ptq


def test_planted_layer_has_the_lowest_local_sqnr(planted):
    model, calib, evaluation = planted
    quant = copy.deepcopy(model)
    run_ptq(quant, calib, ["max"])
    errors = {e.layer: e for e in layer_errors(model, quant, evaluation[:2])}
    assert set(errors) == {"fc1", "bad", "fc3", "head"}
    worst = min(errors.values(), key=lambda e: e.local_sqnr_db)
    assert worst.layer == "bad"
    assert errors["bad"].local_sqnr_db < 15 < min(errors[n].local_sqnr_db for n in ("fc1", "fc3", "head"))
    # End to end, the damage done in "bad" shows downstream too.
    assert errors["head"].sqnr_db < errors["fc1"].sqnr_db
    assert all(-1.0 <= e.cosine <= 1.0 for e in errors.values())
    # fc1 is the first layer: alone and end to end are the same measurement.
    assert math.isclose(errors["fc1"].sqnr_db, errors["fc1"].local_sqnr_db, rel_tol=1e-6)


def test_quantizers_off_means_no_error(planted):
    from quantlab.attach import set_mode

    model, calib, evaluation = planted
    quant = copy.deepcopy(model)
    run_ptq(quant, calib, ["max"])
    names = ["fc1", "bad", "fc3", "head"]
    set_mode(quant, "off")
    errors = layer_errors(model, quant, evaluation[:1], layers=names)
    assert all(e.sqnr_db == math.inf and e.cosine == 1.0 for e in errors)


def test_row_sqnr_exposes_an_outlier_token():
    """A per-tensor range set by one huge token zeroes the others: global SQNR hides it, per-row does not."""
    import torch
    from torch import nn

    import quantlab as ql

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    x = torch.randn(4, 16, 8)
    x[:, 0] *= 5000.0  # the first token of every sequence carries a massive activation
    quant = ql.quantize(copy.deepcopy(model), ql.int8_config("max"), forward_loop=lambda m: m(x))
    (error,) = layer_errors(model, quant, [x])
    assert error.local_sqnr_db > 30.0  # looks healthy globally ...
    assert error.local_row_sqnr_db < 10.0  # ... but most tokens are destroyed
    assert error.proxy_db == error.local_row_sqnr_db
