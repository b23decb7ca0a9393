"""The built-in loop's CUDA graphs (TrainConfig.cuda_graphs), on the CPU.

The mode checks and the CPU behaviour run as they are. The bookkeeping around the
graphs (which calls replay, what re-captures, what a capture changed in the model
and what a replay does not do in Python) runs with a stand-in capture: it runs the
capture's warm-up forwards (they move BatchNorm statistics, as the real ones do)
and "replays" by calling the model with the Python side effects of a folded
module's forward undone, as a CUDA-graph replay skips them. The real graphs are
tested on a GPU in test_loop_graphs_cuda.py.
"""
import json
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from quantlab import qat
from quantlab.qat import loop_graphs
from quantlab.qat.bn_fold import is_folded
from quantlab.qat.loop import TrainConfig, train
from tests.qat.models import randomize_bn, tiny_cnn

BATCH = 16


def _data(n=BATCH * 5 + 6, seed=0):
    """``n`` random 28x28 images: 5 full batches and a partial one of 6."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def _model(fold_bn=False, freeze_bn_after=None, learn_amax=False):
    model = randomize_bn(tiny_cnn())
    calib = [(torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)), None)]
    return qat.prepare(model, data=calib, calibrator="max", fold_bn=fold_bn, freeze_bn_after=freeze_bn_after,
                       learn_amax=learn_amax)


def _config(**kw):
    return TrainConfig(**{"epochs": 1.0, "lr": 3e-3, "batch_size": BATCH, "optimizer": "sgd", "shuffle": False, **kw})


def _assert_same_model(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name
        else:
            assert x == y, name  # a folded module's extra state: step counter and frozen flag


# -- modes -------------------------------------------------------------------------------------------------
def test_bad_mode_is_refused():
    with pytest.raises(qat.QATError, match="cuda_graphs must be one of auto, on, off"):
        TrainConfig(cuda_graphs="yes")
    assert TrainConfig().cuda_graphs == "auto"


def test_on_with_a_cpu_model_is_one_clear_error_before_any_step(tmp_path):
    steps = []
    with pytest.raises(qat.QATError, match=r"cuda_graphs='on' cannot be honoured: the model is on cpu") as info:
        train(_model(), _data(), _config(cuda_graphs="on", checkpoint_every=1), checkpoint_dir=tmp_path,
              progress=steps.append)
    assert "\n" not in str(info.value)
    assert steps == [] and not any(tmp_path.iterdir())


def test_auto_on_the_cpu_is_the_eager_loop():
    results, models = {}, {}
    for mode in ("auto", "off"):
        models[mode] = _model(fold_bn=True, freeze_bn_after=2)
        results[mode] = train(models[mode], _data(), _config(cuda_graphs=mode, freeze_bn_after=2))
    assert results["auto"].losses == results["off"].losses
    _assert_same_model(models["auto"], models["off"])
    report = results["auto"].cuda_graphs
    assert report["used"] is False and report["graphed_steps"] == 0 and report["eager_steps"] == 6
    assert "cpu" in report["eager_reason"] and report["requested"] == "auto"
    assert results["off"].cuda_graphs["eager_reason"] == "cuda_graphs=off"


# -- the bookkeeping, with a stand-in capture ----------------------------------------------------------------
class _FakeCapture:
    """Stands in for ``quantlab.qat.graphs.capture`` on the CPU (see the module docstring)."""

    def __init__(self, fail=False):
        self.fail = fail
        self.captures = 0
        self.replays = 0

    def __call__(self, step, args, device, *, warmup, allow_unused):
        assert allow_unused and device.type == "cpu"
        self.captures += 1
        for _ in range(warmup + 1):  # the warm-up passes and the captured forward run the model's Python
            step(*args)
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        folded = [m for m in step.modules() if is_folded(m)]

        def replay(*tensors):
            assert [t.shape for t in tensors] == [a.shape for a in args]
            self.replays += 1
            saved = [(m, m.train_steps, m.bn_frozen) for m in folded]
            out = step(*tensors)
            for m, n, frozen in saved:  # a replay runs no Python: the counters stay as they were
                m.train_steps, m.bn_frozen = n, frozen
            return out

        return replay


@pytest.fixture()
def fake(monkeypatch):
    capture = _FakeCapture()
    monkeypatch.setattr(loop_graphs, "capture", capture)
    monkeypatch.setattr(loop_graphs, "eager_reason", lambda model, mode: None if mode != "off" else "cuda_graphs=off")
    return capture


@pytest.mark.parametrize("fold_bn", [False, True], ids=["plain BN", "BN folded"])
def test_graphed_loop_trains_like_the_eager_loop_partial_batch_and_bn_freeze(fake, fold_bn):
    # freeze_bn_after=2 both ways: the loop's freeze_bn_stats and (folded) the modules' own freeze.
    runs = {}
    for mode in ("auto", "off"):
        model = _model(fold_bn=fold_bn, freeze_bn_after=2 if fold_bn else None)
        runs[mode] = (model, train(model, _data(), _config(cuda_graphs=mode, freeze_bn_after=2)))
    (graphed, g), (eager, e) = runs["auto"], runs["off"]
    assert g.losses == e.losses
    _assert_same_model(graphed, eager)  # BN statistics too: the capture's warm-up was undone
    # 5 full batches replayed, the partial one eager; captured again once BatchNorm froze.
    assert g.cuda_graphs == {"requested": "auto", "used": True, "graphed_steps": 5, "eager_steps": 1, "captures": 2,
                             "eager_reason": None}
    assert fake.replays == 5
    if fold_bn:
        folded = [m for m in graphed.modules() if is_folded(m)]
        assert folded and all(m.bn_frozen and m.train_steps == 6 for m in folded)


def test_folded_modules_freeze_themselves_between_replays(fake):
    # Only prepare's freeze_bn_after: the folded modules freeze inside their forward (step 4 here),
    # which a replay does not run; the loop applies it first and captures again.
    runs = {}
    for mode in ("auto", "off"):
        model = _model(fold_bn=True, freeze_bn_after=3)
        runs[mode] = (model, train(model, _data(), _config(cuda_graphs=mode)))
    assert runs["auto"][1].losses == runs["off"][1].losses
    _assert_same_model(runs["auto"][0], runs["off"][0])
    assert runs["auto"][1].cuda_graphs["captures"] == 2


def test_quantizer_and_train_mode_changes_capture_again(fake):
    def switch(model):
        def progress(p):
            if p.step == 2:
                qat.set_enabled(model, False)  # quantizer modes: the captured forward quantizes
            if p.step == 3:
                model.eval()  # left in eval mode: BatchNorm normalizes with its running statistics

        return progress

    runs = {}
    for mode in ("auto", "off"):
        model = _model()
        runs[mode] = (model, train(model, _data(), _config(cuda_graphs=mode), progress=switch(model)))
    assert runs["auto"][1].losses == runs["off"][1].losses
    _assert_same_model(runs["auto"][0], runs["off"][0])
    assert runs["auto"][1].cuda_graphs["captures"] == 3


def test_an_evaluation_between_steps_that_restores_train_mode_keeps_the_graphs(fake):
    model = _model()
    probe = torch.randn(4, 1, 28, 28)

    def evaluate(p):
        model.eval()
        with torch.no_grad():
            model(probe)
        model.train()

    result = train(model, _data(), _config(), progress=evaluate)
    assert result.cuda_graphs["captures"] == 1 and result.cuda_graphs["graphed_steps"] == 5


def test_a_failed_capture_falls_back_to_eager_with_one_log_line(monkeypatch, caplog):
    failing = _FakeCapture(fail=True)
    monkeypatch.setattr(loop_graphs, "capture", failing)
    monkeypatch.setattr(loop_graphs, "eager_reason", lambda model, mode: None if mode != "off" else "cuda_graphs=off")
    runs = {}
    with caplog.at_level(logging.WARNING, logger="quantlab.qat.loop_graphs"):
        for mode in ("auto", "off"):
            model = _model(fold_bn=True, freeze_bn_after=2)
            runs[mode] = (model, train(model, _data(), _config(cuda_graphs=mode)))
    assert runs["auto"][1].losses == runs["off"][1].losses
    _assert_same_model(runs["auto"][0], runs["off"][0])  # the failed capture's warm-up was undone too
    report = runs["auto"][1].cuda_graphs
    assert report["used"] is False and report["eager_steps"] == 6 and failing.captures == 1
    assert report["eager_reason"].startswith("capture failed: RuntimeError: operation not permitted")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "eager" in lines[0]


def test_captures_are_capped(fake, monkeypatch):
    monkeypatch.setattr(loop_graphs, "MAX_CAPTURES", 2)
    model = _model()

    def toggle(p):
        qat.set_enabled(model, p.step % 2 == 0)

    result = train(model, _data(), _config(), progress=toggle)
    report = result.cuda_graphs
    assert fake.captures == 2 and report["graphed_steps"] == 2 and "2 captures used up" in report["eager_reason"]


class _TinyLM(nn.Module):
    """Keyword inputs (input_ids, attention_mask), as the causal-LM task calls a model."""

    def __init__(self, vocab=32, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = torch.relu(self.proj(self.embed(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask[..., None].to(h.dtype)
        return {"logits": self.head(h)}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=40, length=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 32, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def test_keyword_inputs_of_the_causal_lm_task_replay(fake):
    runs = {}
    for mode in ("auto", "off"):
        torch.manual_seed(0)
        model = _TinyLM()
        calib = [{"input_ids": _Rows().ids[:8], "attention_mask": torch.ones(8, 12, dtype=torch.long)}]
        qat.prepare(model, data=calib, calibrator="max")
        runs[mode] = (model, train(model, _Rows(), _config(task="causal_lm", cuda_graphs=mode)))
    assert runs["auto"][1].losses == runs["off"][1].losses
    _assert_same_model(runs["auto"][0], runs["off"][0])
    assert runs["auto"][1].cuda_graphs["graphed_steps"] == 2  # 40 rows at 16: two full batches, one of 8


# -- the CLI and the run record -----------------------------------------------------------------------------
def _cli_args(out, *extra):
    return ["qat", "--model", "tests/qat/models.py:tiny_cnn", "--data", "fmnist:train[:192]", "--eval", "fmnist:test[:64]",
            "--out", str(out), "--max-steps", "3", "--lr", "3e-3", "--batch-size", "32", "--calibrator", "max",
            "--calib-batches", "1", *extra]


def test_cli_on_with_the_cpu_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from quantlab.cli.main import main

    monkeypatch.setenv("QUANTLAB_STORE", str(tmp_path / "runs.sqlite"))
    assert main(_cli_args(tmp_path / "run", "--device", "cpu", "--cuda-graphs", "on")) == 1
    err = capsys.readouterr().err
    assert "error: --cuda-graphs on needs a CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs.sqlite").exists()


def test_the_run_records_whether_graphs_were_used(tmp_path, monkeypatch, capsys):
    from quantlab.cli.main import main
    from quantlab.store import RunStore

    monkeypatch.setenv("QUANTLAB_STORE", str(tmp_path / "runs.sqlite"))
    assert main(_cli_args(tmp_path / "run")) == 0
    assert "CUDA graphs: not used (the model is on cpu" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["cuda_graphs"]["used"] is False and summary["cuda_graphs"]["eager_steps"] == 3
    (run,) = RunStore(tmp_path / "runs.sqlite").list_runs(kind="qat")
    planned = run["config"]["cuda_graphs"]
    assert planned["requested"] == "auto" and planned["planned"] == "eager" and "cpu" in planned["eager_reason"]
    assert run["config"]["train"]["cuda_graphs"] == "auto"
