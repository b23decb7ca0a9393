"""The compare job's "2:4 + INT8" rows on a real GPU: pruned, calibrated on CUDA, timed by the cuSPARSELt
runner (no stubs; runs only where CUDA and cuSPARSELt are available: the GPU machine, not CI)."""
import pytest
import torch
from torch import nn

from quantlab.jobs.compare import run_compare
from quantlab.store import RunStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _Mlp(nn.Module):
    """GEMMs large enough for the sparse kernels to be timed meaningfully (4096 tokens x 1024)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(1024, 4096)
        self.down = nn.Linear(4096, 1024)
        self.head = nn.Linear(1024, 16)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def test_sparse_rows_timed_on_the_gpu_are_recorded(tmp_path):
    from quantlab.runtimes.cusparselt.library import CuSparseLtUnavailableError, load_library
    from quantlab.sparsity.compare import SparseCompare
    from quantlab.sparsity.mask import masked_layers

    try:
        load_library()
    except CuSparseLtUnavailableError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    model = _Mlp().cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        calib, evaluation = ([(x, model(x).argmax(1)) for x in (torch.randn(4096, 1024, device="cuda", generator=g) for _ in range(2))]
                             for _ in range(2))
    store = RunStore(tmp_path / "runs.sqlite")
    result = run_compare(model, calib, evaluation, metric="top1", calibrators="max", precisions="fp32,fp16,int8",
                         layer_batches=0, store=store, run_dir=tmp_path / "run",
                         sparsity=SparseCompare(exclude=("head",)))
    assert not masked_layers(model)  # the caller's model: not pruned
    outcome = result.sparsity
    assert outcome.speed_note is None, outcome.speed_note
    assert outcome.speed["fp16_ms"] > 0 and outcome.speed["int8_ms"] > 0
    rows = {(r["precision"], r["calibrator"], r["source"], r["metric"]): r["value"] for r in store.results(result.run_id)}
    assert rows[("fp16", None, "ptq", "latency_ms")] == outcome.speed["fp16_ms"]
    assert rows[("int8", "max", "sparse", "latency_ms")] == outcome.speed["int8_ms"]
    # One-shot 2:4 pruning of random weights costs accuracy, but the row is a real evaluation.
    assert 0.0 <= rows[("int8", "max", "sparse", "top1")] <= 100.0
    assert store.get_run(result.run_id)["status"] == "done"
