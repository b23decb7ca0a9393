"""Calibration and QAT throughput on 1, 2, ... GPUs of one host (torchrun, NCCL).

Run on a multi-GPU machine (repo root as cwd, after ``source benchmarks/gpu_setup.sh``):

    python benchmarks/bench_multi_gpu.py --gpus 1,2 --append benchmarks/RESULTS.md

For each GPU count the script starts ``torchrun --nproc-per-node N`` on itself.
Every rank takes batches ``b % N == rank`` of the same calibration batches
(:func:`quantlab.batching.shard_batches`), runs quantlab's one statistics
pass and all four calibrators (:func:`quantlab.ptq.run_ptq` merges the
histograms exactly), then trains QAT with DDP for a fixed number of steps at a
fixed batch per GPU. Rank 0 saves the scales; the driver then checks that the
histograms of N GPUs are bit-identical to one GPU's and the ranges equal, and
prints one table.

NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1), as the GPU machines' documentation requires.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, machine_header, markdown_table  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CALIBRATORS = ("max", "percentile", "entropy", "mse")


# -- one rank ---------------------------------------------------------------------------------------------
class _RandomImages(torch.utils.data.Dataset):
    """``length`` samples cycling over 256 fixed uint8 images (cheap to load, same on every rank)."""

    def __init__(self, length: int, shape: tuple, classes: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.images = torch.randint(0, 256, (256, *shape), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, classes, (256,), generator=g)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        i = index % 256
        return self.images[i].float().div_(64.0).sub_(2.0), self.labels[i]


def _worker(args: argparse.Namespace) -> None:
    from _models import make_workload

    from quantlab import batching, distributed, qat
    from quantlab.ptq import run_ptq
    from quantlab.qat.loop import TrainConfig, train

    info = distributed.init_from_env(args.device)
    device = distributed.default_device(info, args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = Path(args.out)
    workload = make_workload(args.model, args.samples, args.batch_size)
    try:
        # Warm-up on a throwaway model: kernel compilation (cached on disk) and cuDNN's choices.
        warm = batching.shard_batches(workload.batches(device), info.rank, info.world_size, 2)
        run_ptq(workload.build().to(device), warm, "all", across_ranks=True)
        times = []
        for _ in range(args.repeats):
            model = workload.build().to(device)
            sync()
            distributed.barrier()
            start = time.perf_counter()
            result = run_ptq(model, batching.shard_batches(workload.batches(device), info.rank, info.world_size), "all",
                             across_ranks=True)
            sync()
            distributed.barrier()
            times.append((time.perf_counter() - start, result.statistics_seconds, sum(result.calibrate_seconds.values())))
        wall, stats, calib = min(times)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            for name, scales in result.scales.items():
                scales.save(out / f"scales.{name}.json")

        # QAT: DDP over the ranks, fixed batch per GPU, starting from the entropy ranges.
        qat_model = workload.build().to(device)
        qat.prepare(qat_model, scales=result.scales["entropy"])
        steps, warm = args.qat_steps, args.qat_warmup
        example = workload.example()
        with torch.no_grad():
            classes = workload.build()(example).shape[-1]
        images = _RandomImages(steps * args.qat_batch * info.world_size, tuple(example.shape[1:]), classes)
        data = torch.utils.data.DataLoader(images, batch_size=args.qat_batch, num_workers=args.loader_workers,
                                           pin_memory=device.type == "cuda")
        marks: Dict[int, float] = {}

        def progress(p) -> None:
            marks[p.step] = time.perf_counter()  # the loop all-reduces each step's loss: steps are synchronous

        trained = train(qat_model, data, TrainConfig(max_steps=steps, epochs=1.0, lr=1e-5, seed=0), progress=progress)
        agreed = qat.ddp.check_ranges_agree(qat_model)
        seconds = marks[trained.steps] - marks[warm]
        qat_rate = (trained.steps - warm) * args.qat_batch * info.world_size / seconds
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        if info.is_main:
            summary = {
                "gpus": info.world_size, "samples": args.samples, "calib_seconds": wall, "stats_seconds": stats,
                "calibrators_seconds": calib, "calib_rate": args.samples / wall, "qat_rate": qat_rate,
                "qat_steps": trained.steps, "qat_step_ms": seconds / (trained.steps - warm) * 1000,
                "ranges_agree_on": agreed, "final_loss": trained.losses[-1], "device_peak_gib": peak / 2**30,
            }
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    finally:
        distributed.destroy()


# -- driver ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _same_as(one: Path, many: Path) -> Dict[str, bool]:
    from quantlab.scales import Scales

    histograms, ranges = True, True
    for name in CALIBRATORS:
        a, b = Scales.load(one / f"scales.{name}.json"), Scales.load(many / f"scales.{name}.json")
        histograms &= a.statistics.keys() == b.statistics.keys() and all(
            s.counts.equal(b.statistics[k].counts) and (s.bin_width, s.amax) == (b.statistics[k].bin_width, b.statistics[k].amax)
            for k, s in a.statistics.items())
        ranges &= {e.key: e.amax for e in a.entries} == {e.key: e.amax for e in b.entries}
    return {"histograms": histograms, "ranges": ranges}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="/tmp/ql_multi_gpu", help="scratch folder for the ranks' results")
    parser.add_argument("--gpus", default=None, help="comma list of GPU counts (default 1 and every count up to all GPUs)")
    parser.add_argument("--device", default="cuda", help="cuda (one GPU per rank, NCCL), or cpu (gloo) for a smoke run")
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "fmnist"], help="benchmark model (default resnet50)")
    parser.add_argument("--loader-workers", type=int, default=4, help="DataLoader workers per rank for QAT")
    parser.add_argument("--samples", type=int, default=1024, help="calibration samples, all ranks together")
    parser.add_argument("--batch-size", type=int, default=64, help="calibration batch")
    parser.add_argument("--repeats", type=int, default=2, help="calibration runs per GPU count (the fastest is kept)")
    parser.add_argument("--qat-steps", type=int, default=30)
    parser.add_argument("--qat-warmup", type=int, default=5, help="steps left out of the QAT timing")
    parser.add_argument("--qat-batch", type=int, default=64, help="QAT batch per GPU")
    parser.add_argument("--append", metavar="PATH", help="also append the dated section to this results file")
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    available = torch.cuda.device_count() if args.device == "cuda" else 2
    counts = [int(c) for c in args.gpus.split(",")] if args.gpus else sorted({1, *[n for n in (2, 4, 8) if n <= available]})
    if not available or max(counts) > available:
        raise SystemExit(f"asked for {max(counts)} GPU(s); this machine has {available}")
    env = {**os.environ, **NO_MULTICAST, "OMP_NUM_THREADS": "4" if args.device == "cuda" else "1"}
    summaries: List[Dict[str, Any]] = []
    for n in counts:
        out = Path(args.out) / f"gpus{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(_free_port()),
               __file__, "--worker", "--out", str(out), "--model", args.model, "--samples", str(args.samples),
               "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--qat-steps", str(args.qat_steps),
               "--qat-warmup", str(args.qat_warmup), "--qat-batch", str(args.qat_batch), "--device", args.device,
               "--loader-workers", str(args.loader_workers)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"torchrun with {n} GPU(s) failed ({done.returncode}):\n{done.stderr[-4000:]}")
        summary = json.loads((out / "summary.json").read_text())
        summary.update(_same_as(Path(args.out) / f"gpus{counts[0]}", out))
        summaries.append(summary)
    base = summaries[0]
    rows = [[s["gpus"], f"{s['calib_seconds']:.2f}", f"{s['stats_seconds']:.2f}", f"{s['calibrators_seconds']:.2f}",
             f"{s['calib_rate']:.0f}", f"{s['calib_rate'] / base['calib_rate']:.2f}x",
             f"{s['qat_step_ms']:.1f}", f"{s['qat_rate']:.0f}", f"{s['qat_rate'] / base['qat_rate']:.2f}x",
             "yes" if s["histograms"] else "NO", "yes" if s["ranges"] else "NO",
             f"yes ({s['ranges_agree_on']})" if s["gpus"] > 1 else "-", f"{s['device_peak_gib']:.1f}"]
            for s in summaries]
    headers = ["GPUs", "calibration s (pass + 4 calibrators)", "stats pass s", "calibrators s", "calib samples/s", "speed-up",
               "QAT ms/step", "QAT samples/s", "speed-up", "histograms = 1 GPU", "amax = 1 GPU", "QAT quantizers equal on all ranks",
               "peak GPU GiB (rank 0)"]
    title = f"Multi-GPU scaling: {args.model}, {args.samples} calibration samples (batch {args.batch_size}), QAT batch {args.qat_batch} per GPU"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else "- (gloo, CPU smoke run)"
    extra = {"GPUs used": ",".join(map(str, counts)), "NCCL": nccl, **NO_MULTICAST}
    emit(machine_header(title, extra) + "\n" + markdown_table(headers, rows), args.append)
    if not all(s["histograms"] and s["ranges"] for s in summaries):
        raise SystemExit("multi-GPU statistics differ from one GPU's")


if __name__ == "__main__":
    main()
