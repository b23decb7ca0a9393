"""One rank of the 2-process DDP test (started by torch.multiprocessing.spawn)."""
import os

import torch
from torch.utils.data import TensorDataset


def calibration_shard(rank: int, world: int):
    from quantlab.data import load_fmnist

    x, _ = load_fmnist("train[:512]")
    shard = x[rank::world][:192]  # different images on every rank
    return [(shard[i : i + 64], None) for i in range(0, len(shard), 64)]


def _failures_reach_every_rank(rank: int, images) -> dict:
    """A NaN in rank 1's shard, and a calibrator error on the only rank that owns a tensor:
    every rank must raise (none may wait in the next collective)."""
    from torch import nn

    from quantlab.ptq import run_ptq

    out = {}
    shard = [(images[rank * 64:(rank + 1) * 64].clone(), None)]
    if rank == 1:
        shard[0][0][3, 0, 5, 5] = float("nan")
    try:
        run_ptq(_tiny_model(), shard, "max", across_ranks=True)
        out["nan"] = ""
    except Exception as exc:  # noqa: BLE001 - the test compares the messages
        out["nan"] = f"{type(exc).__name__}: {exc}"
    linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # one quantized tensor: rank 1 owns none
    try:
        run_ptq(linear, [(images[rank * 8:(rank + 1) * 8], None)], "percentile",
                calibrator_params={"percentile": {"percentile": 150.0}}, across_ranks=True)
        out["calibrator"] = ""
    except Exception as exc:  # noqa: BLE001
        out["calibrator"] = f"{type(exc).__name__}: {exc}"
    return out


def _tiny_model():
    from tests.qat.models import tiny_cnn

    return tiny_cnn()


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from quantlab import qat
    from quantlab.attach import iter_quantizers
    from quantlab.data import load_fmnist
    from quantlab.qat import ddp
    from quantlab.qat.errors import QATError
    from quantlab.qat.loop import TrainConfig, train
    from tests.qat.models import tiny_cnn

    info = ddp.init_from_env("cpu")
    assert info.backend == "gloo" and info.world_size == world and info.rank == rank
    try:
        model = qat.prepare(tiny_cnn(), data=calibration_shard(rank, world), calibrator="entropy", learn_amax=True)
        collectors = {r.module_name: (r.quantizer.collector.counts.clone(), r.quantizer.collector.bin_width,
                                      r.quantizer.collector.amax, r.quantizer.collector.num_batches)
                      for r in iter_quantizers(model) if r.role == "input"}
        prepared = {r.key: r.quantizer.amax.detach().clone() for r in iter_quantizers(model)}
        x, y = load_fmnist("train[:512]")
        # A folder per rank, so the test sees which ranks wrote checkpoints (rank 0 alone should).
        result = train(model, TensorDataset(x, y), TrainConfig(epochs=2, lr=1e-2, batch_size=16, checkpoint_every=8),
                       checkpoint_dir=os.path.join(out_dir, f"ckpt{rank}"))
        trained = {r.key: r.quantizer.amax.detach().clone() for r in iter_quantizers(model)}
        weights = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        agreed = ddp.check_ranges_agree(model)
        if rank == 1:  # one rank's range nudged by one ulp: every rank must refuse
            quantizer = next(r.quantizer for r in iter_quantizers(model) if r.role == "input")
            with torch.no_grad():
                quantizer.amax.copy_(torch.nextafter(quantizer.amax, quantizer.amax + 1))
        try:
            ddp.check_ranges_agree(model)
            mismatch = ""
        except ddp.RangeMismatchError as exc:
            mismatch = str(exc)
        try:  # SyncBatchNorm needs CUDA: refused on gloo before any collective, on every rank
            train(tiny_cnn(), TensorDataset(x[:64], y[:64]), TrainConfig(max_steps=1, batch_size=16, sync_batchnorm=True))
            sync_error = ""
        except QATError as exc:
            sync_error = str(exc)
        failures = _failures_reach_every_rank(rank, x)
        torch.save({"prepared": prepared, "sync_error": sync_error, "failures": failures, "trained": trained, "losses": result.losses, "collectors": collectors,
                    "agreed": agreed, "mismatch": mismatch,
                    "steps": result.steps, "weights": weights},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        ddp.destroy()
