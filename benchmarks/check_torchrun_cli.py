"""`quantlab calibrate` and `quantlab qat` under torchrun on N GPUs against one GPU (the CLI as users run it).

    python benchmarks/check_torchrun_cli.py --gpus 2 --append benchmarks/RESULTS.md

Calibration: one process on one GPU, then ``torchrun --nproc-per-node N``; the
scales files must hold bit-identical histograms and equal ranges.
QAT: one GPU at batch B, then N GPUs at batch B/N per GPU (the same global
batch and sample order), same steps; the per-step losses (mean over ranks) are
compared, every rank's ranges are checked equal inside the run (it fails
otherwise), and the run folder must hold one set of files (rank 0 writes).
The demo model on real Fashion-MNIST. NVLink multicast stays off.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, machine_header, markdown_table  # noqa: E402
from bench_multi_gpu import CALIBRATORS, NO_MULTICAST, _free_port, _same_as  # noqa: E402

MODEL = "quantlab.models.fmnist:pretrained_fmnist_cnn"
QAT_FILES = {"checkpoint.pt", "model.pt", "qat.json", "run.json", "scales.json", "scales.start.json"}


def _quantlab(nproc: int, args: list) -> float:
    """Runs ``quantlab ARGS`` in one process (nproc 0) or under torchrun; returns its wall time."""
    launcher = [sys.executable, "-m", "quantlab"] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), "-m", "quantlab"]
    start = time.perf_counter()
    # Started outside the checkout, so `-m quantlab` imports the installed package, not ./quantlab.
    done = subprocess.run(launcher + args, env={**os.environ, **NO_MULTICAST, "OMP_NUM_THREADS": "4"}, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"quantlab {' '.join(args[:1])} on {nproc or 1} process(es) failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the torchrun job (one GPU each)")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL), or cpu (gloo) for a smoke run")
    parser.add_argument("--out", default="/tmp/ql_torchrun_cli")
    parser.add_argument("--qat-steps", type=int, default=200)
    parser.add_argument("--qat-batch", type=int, default=64, help="global batch (one GPU); N GPUs get batch/N each")
    parser.add_argument("--append", metavar="PATH")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    n = args.gpus

    calib = ["calibrate", "--model", MODEL, "--data", "fmnist:calib", "--batch-size", "64", "--device", args.device]
    t_one = _quantlab(0, calib + ["--out", str(out / "calib1")])
    t_many = _quantlab(n, calib + ["--out", str(out / f"calib{n}")])
    same = _same_as(out / "calib1", out / f"calib{n}")
    s_one = json.loads((out / "calib1" / "calibration.json").read_text())
    s_many = json.loads((out / f"calib{n}" / "calibration.json").read_text())

    qat = ["qat", "--model", MODEL, "--data", "fmnist:train", "--eval", "fmnist:test", "--device", args.device,
           "--max-steps", str(args.qat_steps), "--lr", "1e-4", "--calibrator", "entropy", "--checkpoint-every", "50", "--no-store"]
    # (label, processes, extra arguments): one GPU twice (another sample order = the noise), then N GPUs.
    runs = [("1 GPU, seed 0", 0, ["--seed", "0"]), ("1 GPU, seed 1 (noise reference)", 0, ["--seed", "1"]),
            (f"{n} GPUs, seed 0, BatchNorm per GPU", n, ["--seed", "0"])]
    if args.device == "cuda":
        runs.append((f"{n} GPUs, seed 0, --sync-bn", n, ["--seed", "0", "--sync-bn"]))
    results = []
    for i, (label, nproc, extra) in enumerate(runs):
        folder = out / f"qat{i}"
        batch = args.qat_batch // max(1, nproc)
        seconds = _quantlab(nproc, qat + extra + ["--batch-size", str(batch), "--out", str(folder)])
        results.append((label, seconds, json.loads((folder / "run.json").read_text()), {p.name for p in folder.iterdir()}))

    def mean(xs):
        return sum(xs) / len(xs)

    reference = results[0][2]["losses"]
    rows = [["calibrate, 4 calibrators, 1,000 images", f"1 GPU: {s_one['num_batches']} batches, {t_one:.1f} s ({s_one['statistics_seconds']:.2f} s pass)",
             f"{n} GPUs: {s_many['num_batches']} batches, {t_many:.1f} s ({s_many['statistics_seconds']:.2f} s pass)",
             f"histograms bit-identical: {'yes' if same['histograms'] else 'NO'}; amax equal (4 calibrators): {'yes' if same['ranges'] else 'NO'}"]]
    for label, seconds, run, files in results:
        losses = run["losses"]
        diffs = [abs(a - b) for a, b in zip(reference, losses)]
        rows.append([f"qat, {args.qat_steps} steps, global batch {args.qat_batch}", label,
                     f"loss mean first/last 50 steps {mean(losses[:50]):.4f} / {mean(losses[-50:]):.4f}; INT8 top-1 {run['qat']:.2f}; {seconds:.1f} s",
                     f"per-step abs(loss - loss of 1 GPU seed 0): mean {mean(diffs):.4f}, max {max(diffs):.4f}; "
                     f"files {'= the 6 expected' if files == QAT_FILES else sorted(files)}; world size {run['world_size']}"])
    ok = same["histograms"] and same["ranges"] and all(files == QAT_FILES for *_, files in results)
    ok = ok and all(run["world_size"] == max(1, nproc) for (_, nproc, _), (_, _, run, _) in zip(runs, results))
    section = machine_header(f"torchrun CLI on {n} GPUs vs one GPU: demo model, Fashion-MNIST", {**NO_MULTICAST})
    emit(section + "\n" + markdown_table(["command", "run", "result", "agreement"], rows), args.append)
    if not ok:
        raise SystemExit("torchrun results differ from one GPU beyond what is expected")


if __name__ == "__main__":
    main()
