"""DDP on 2 CPU processes (gloo): exact merged statistics, identical ranges, decreasing loss."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

import quantlab as ql
from quantlab import collect_statistics
from quantlab.batching import forward_loop
from tests.qat import ddp_worker
from tests.qat.models import tiny_cnn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_worker.run, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ranges_are_identical_on_both_ranks(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["prepared"].keys() == r1["prepared"].keys()
    for key in r0["prepared"]:
        assert torch.equal(r0["prepared"][key], r1["prepared"][key]), key
        assert torch.equal(r0["trained"][key], r1["trained"][key]), key
    for name, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][name]), name


def test_merged_statistics_equal_one_process_merging_both_shards(two_ranks):
    """The all-reduced histograms are bit-identical to HistogramCollector.merge_ of the shards."""
    _, (r0, r1) = two_ranks
    shards = []
    for rank in range(2):
        model = ql.quantize(tiny_cnn())
        collect_statistics(model, forward_loop(ddp_worker.calibration_shard(rank, 2)))
        shards.append({r.module_name: r.quantizer.collector for r in ql.iter_quantizers(model) if r.role == "input"})
    merged_model = ql.quantize(tiny_cnn())
    for ref in ql.iter_quantizers(merged_model):
        if ref.role != "input":
            continue
        merged = shards[0][ref.module_name].merge_(shards[1][ref.module_name])
        counts, width, amax, batches = r0["collectors"][ref.module_name]
        assert torch.equal(counts, merged.counts) and width == merged.bin_width and amax == merged.amax
        assert batches == merged.num_batches == 6
        assert torch.equal(counts, r1["collectors"][ref.module_name][0])
        ref.quantizer.collector = merged
    # ...so the entropy ranges equal a single-process calibration on all the data.
    expected = ql.calibrate(merged_model, "entropy")
    for entry in expected.entries:
        if entry.role == "input":
            assert r0["prepared"][entry.key].item() == pytest.approx(entry.amax, rel=0, abs=0)


def test_loss_decreases_and_rank0_checkpoints(two_ranks):
    out, (r0, r1) = two_ranks
    assert r0["steps"] == 32  # 2 epochs of 512 samples / 2 ranks / batch 16
    assert r0["losses"] == r1["losses"]  # the mean over ranks, all-reduced
    first, last = sum(r0["losses"][:8]) / 8, sum(r0["losses"][-8:]) / 8
    assert last < first, (first, last)
    checkpoint = torch.load(out / "ckpt0" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 32 and len(checkpoint["rng"]) == 2
    assert not list((out / "ckpt0").glob(".checkpoint.pt.*"))  # no temporary file left behind


def test_checkpoints_are_written_by_rank_0_only(two_ranks):
    out, _ = two_ranks
    assert (out / "ckpt0" / "checkpoint.pt").is_file()
    assert not (out / "ckpt1").exists() or not any((out / "ckpt1").iterdir())


def test_a_range_that_differs_on_one_rank_is_refused_on_every_rank(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["agreed"] == r1["agreed"] == len(r0["trained"]) > 0
    first_input = next(k for k in r0["trained"] if k.endswith(":input"))
    for ranks in (r0, r1):
        assert "ranges differ across ranks" in ranks["mismatch"] and first_input in ranks["mismatch"]


def test_sync_batchnorm_is_refused_on_cpu_ranks(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        assert "sync_batchnorm needs every rank on a CUDA device" in r["sync_error"]


def test_a_failure_on_one_rank_is_raised_on_every_rank(two_ranks):
    _, (r0, r1) = two_ranks
    assert r1["failures"]["nan"].startswith("NonFiniteActivationError") and "stem.0" in r1["failures"]["nan"]
    assert r0["failures"]["nan"].startswith("RankFailedError: the statistics pass failed on rank 1: NonFiniteActivationError")
    assert r0["failures"]["calibrator"] and "percentile" in r0["failures"]["calibrator"]
    assert r1["failures"]["calibrator"].startswith("RankFailedError: choosing the ranges failed on rank 0")
