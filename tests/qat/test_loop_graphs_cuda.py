"""The built-in loop with real CUDA graphs (run on the GPU machine, skipped elsewhere).

Each test trains the same model on the same batches twice, graphed (``cuda_graphs``
auto/on) and eager (off), and compares losses and every parameter and buffer after
the run. The tolerance (rel 1e-4, abs 1e-5, as tests/qat/test_graphed.py) covers
the floating-point noise of kernels that replay in another order; a graph that
computed something else (a stale train/eval mode, quantizer mode or BatchNorm
freeze) is off by far more.
"""
import pytest
import torch
from torch import nn

from quantlab import qat
from quantlab.qat.bn_fold import is_folded
from quantlab.qat.loop import TrainConfig, train
from tests.qat.models import randomize_bn, tiny_cnn
from tests.qat.test_loop_graphs import BATCH, _data, _Rows, _TinyLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def _deterministic():
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = before


def _model(**options):
    model = randomize_bn(tiny_cnn()).cuda()
    calib = [(torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)), None)]
    return qat.prepare(model, data=calib, calibrator="max", **options)


def _config(**kw):
    return TrainConfig(**{"epochs": 1.0, "lr": 3e-3, "batch_size": BATCH, "optimizer": "sgd", "shuffle": False, **kw})


def _both(make_model, data, config_kw, progress=None, graphed_mode="auto"):
    """(graphed model, its result, eager model, its result) on the same data."""
    out = []
    for mode in (graphed_mode, "off"):
        torch.manual_seed(0)
        model = make_model()
        callback = progress(model) if progress else None
        out += [model, train(model, data, _config(cuda_graphs=mode, **config_kw), progress=callback)]
    return out


def _assert_close(graphed, g, eager, e):
    assert g.losses == pytest.approx(e.losses, rel=RTOL, abs=ATOL)
    for (name, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert torch.allclose(a, b, rtol=RTOL, atol=ATOL), (name, (a - b).abs().max().item())
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name  # BatchNorm's num_batches_tracked
        else:
            assert a == b, name  # a folded module's step counter and frozen flag
    assert g.losses[-1] != g.losses[0]  # it trained


VARIANTS = {
    "fixed ranges": ({}, {}),
    "LSQ": ({"learn_amax": True, "weight_ranges": "learn"}, {}),
    "BN frozen after 2": ({}, {"freeze_bn_after": 2}),
    "BN folded, frozen after 2": ({"fold_bn": True, "freeze_bn_after": 2}, {"freeze_bn_after": 2}),
}


@pytest.mark.parametrize("options,config_kw", list(VARIANTS.values()), ids=list(VARIANTS))
def test_graphed_loop_trains_like_the_eager_loop(options, config_kw):
    graphed, g, eager, e = _both(lambda: _model(**options), _data(), config_kw)
    _assert_close(graphed, g, eager, e)
    # 5 full batches replayed, the last (partial, 6 samples) eager; captured again when BatchNorm froze.
    report = g.cuda_graphs
    assert (report["used"], report["graphed_steps"], report["eager_steps"]) == (True, 5, 1), report
    assert report["captures"] == (2 if config_kw else 1) and report["eager_reason"] is None
    assert e.cuda_graphs["used"] is False
    if options.get("fold_bn"):
        assert all(m.bn_frozen and m.train_steps == 6 for m in graphed.modules() if is_folded(m))


def test_folded_modules_freezing_themselves_capture_again():
    # Only prepare's freeze_bn_after: the folded modules freeze inside their own forward (step 4).
    graphed, g, eager, e = _both(lambda: _model(fold_bn=True, freeze_bn_after=3), _data(), {}, graphed_mode="on")
    _assert_close(graphed, g, eager, e)
    assert g.cuda_graphs["captures"] == 2 and g.cuda_graphs["graphed_steps"] == 5


def test_mode_changes_between_steps_capture_again():
    def switch(model):
        def progress(p):
            if p.step == 2:
                qat.set_enabled(model, False)  # the first graph quantizes
            if p.step == 3:
                model.eval()  # left in eval mode: BatchNorm normalizes with its running statistics

        return progress

    graphed, g, eager, e = _both(_model, _data(), {}, progress=switch)
    _assert_close(graphed, g, eager, e)
    assert g.cuda_graphs["captures"] == 3 and g.cuda_graphs["graphed_steps"] == 5


class _SyncsInForward(nn.Module):
    """A forward that reads a value on the host: cannot be captured."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if float(x.abs().max()) < 0:  # a host sync (never true)
            x = -x
        return self.net(x)


def test_a_capture_failure_falls_back_to_eager(caplog):
    graphed, g, eager, e = _both(lambda: _SyncsInForward(_model()), _data(), {}, graphed_mode="on")
    _assert_close(graphed, g, eager, e)
    report = g.cuda_graphs
    assert report["used"] is False and report["eager_steps"] == 6 and report["captures"] == 1
    assert report["eager_reason"].startswith("capture failed")
    assert sum("CUDA graphs not used" in r.getMessage() for r in caplog.records) == 1
    # The eager steps ran on the stream the loop was on, not on the failed capture's stream, and the
    # device's RNG left capture mode (quantlab.graph_capture): eager random numbers and dropout work.
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randn(8, device="cuda")
    nn.functional.dropout(torch.ones(8, device="cuda"), 0.5, training=True)


def test_keyword_inputs_of_the_causal_lm_task():
    def make():
        model = _TinyLM().cuda()
        calib = [{"input_ids": _Rows().ids[:8], "attention_mask": torch.ones(8, 12, dtype=torch.long)}]
        return qat.prepare(model, data=calib, calibrator="max")

    graphed, g, eager, e = _both(make, _Rows(), {"task": "causal_lm"})
    _assert_close(graphed, g, eager, e)
    assert g.cuda_graphs["graphed_steps"] == 2 and g.cuda_graphs["eager_steps"] == 1


def test_dropout_draws_fresh_masks_on_every_replay():
    # The same batch 8 times at a negligible LR: the losses differ only through dropout, so equal
    # losses would mean that the replays reuse one mask (they draw from the graph's RNG offsets).
    torch.manual_seed(0)
    model = tiny_cnn()
    model.drop.p = 0.5
    model = qat.prepare(model.cuda(), data=[(torch.randn(32, 1, 28, 28), None)], calibrator="max")
    x, y = _data(n=BATCH).tensors
    data = torch.utils.data.TensorDataset(x.repeat(8, 1, 1, 1), y.repeat(8))
    result = train(model, data, _config(lr=1e-8))
    assert result.cuda_graphs["graphed_steps"] == 8
    assert max(result.losses) - min(result.losses) > 1e-3, result.losses


def test_the_graphs_are_freed_when_the_loop_ends(monkeypatch):
    # A capture's objects form reference cycles (make_graphed_callables' closures and autograd Function,
    # which hold the graphs, their memory pool and input buffers): the loop collects them on a re-capture
    # and when it ends, without waiting for Python's GC (disabled here).
    import gc
    import weakref

    from quantlab.qat import loop_graphs

    real_capture = loop_graphs.capture
    wrappers, inputs = [], []

    def tracked_capture(step, args, device, **kwargs):
        wrappers.append(weakref.ref(step))
        inputs.extend(weakref.ref(a) for a in args)  # the graph's own input buffers
        return real_capture(step, args, device, **kwargs)

    monkeypatch.setattr(loop_graphs, "capture", tracked_capture)
    model = _model()
    gc.collect()
    gc.disable()
    try:
        result = train(model, _data(), _config(freeze_bn_after=2))
        alive = [r for r in wrappers + inputs if r() is not None]
    finally:
        gc.enable()
    assert result.cuda_graphs["captures"] == 2 and len(wrappers) == 2 and len(inputs) == 2
    assert alive == []
