"""Why one calibrator loses accuracy: per-tensor clipping, spikes, and the accuracy when
the worst tensors take another calibrator's range.

For every activation quantizer of the demo CNN (Fashion-MNIST, one statistics pass on
``fmnist:calib``), the table shows the calibrator's amax against the reference calibrator's, the
share of values it clips, the share of exact zeros and the share held by the five most populated
non-zero bins (spikes). Then the test accuracy (10,000 images) with the calibrator's ranges, and
with the reference ranges put back on the N tensors that clip most, N = 1, 2, ...

    .venv/bin/python benchmarks/diagnose_calibrator.py --calibrator entropy --reference max
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402


def accuracy(model: torch.nn.Module, batches: List) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--calibrator", default="entropy")
    parser.add_argument("--reference", default="max")
    parser.add_argument("--restore", type=int, default=3, help="put the reference range back on up to N tensors")
    args = parser.parse_args()
    C.setup_torch(args)
    import quantlab as ql
    from quantlab.data import load_data
    from quantlab.models import pretrained_fmnist_cnn
    from quantlab.ptq import run_ptq

    fp32 = pretrained_fmnist_cnn()
    calib = list(load_data("fmnist:calib", batch_size=256))
    test = list(load_data("fmnist:test", batch_size=1000))
    result = run_ptq(copy.deepcopy(fp32), calib, [args.calibrator, args.reference])
    chosen, reference = result.scales[args.calibrator], result.scales[args.reference]
    ref_amax = {e.module: e.amax for e in reference.entries if e.role == "input"}
    rows, clipping = [], []
    for entry in [e for e in chosen.entries if e.role == "input"]:
        stats = chosen.statistics[entry.module]
        counts = stats.counts.double()
        total = float(counts.sum())
        first_clipped = int(entry.amax / stats.bin_width)  # bins wholly above amax (right-closed bins)
        clipped = float(counts[first_clipped:].sum()) / total
        spikes = float(torch.topk(counts[1:], min(5, len(counts) - 1)).values.sum()) / total
        clipping.append((clipped, entry.module))
        rows.append([entry.module, entry.amax, ref_amax[entry.module], f"{clipped * 100:.2f}%",
                     f"{float(counts[0]) / total * 100:.1f}%", f"{spikes * 100:.1f}%"])

    def evaluate(restored: List[str]) -> float:
        model = ql.load_scales(copy.deepcopy(fp32), chosen)
        for module in restored:
            ql.set_quantizer_amax(model, module, "input", ref_amax[module])
        return accuracy(model, test)

    order = [m for _, m in sorted(clipping, reverse=True)]
    results = [["FP32", "-", accuracy(fp32, test)], [f"INT8, {args.calibrator}", "-", evaluate([])]]
    for n in range(1, min(args.restore, len(order)) + 1):
        results.append([f"INT8, {args.calibrator}, {args.reference} range on the {n} most-clipping", ", ".join(order[:n]),
                        evaluate(order[:n])])
    section = C.machine_header(f"Diagnosis: {args.calibrator} vs {args.reference} on the demo CNN (Fashion-MNIST)")
    section += "\n" + C.markdown_table(["tensor (input of)", f"{args.calibrator} amax", f"{args.reference} amax", "clipped",
                                        "exact zeros", "top-5 bins"], rows)
    section += "\n" + C.markdown_table(["model", "tensors given the reference range", "top-1 %"], results) + "\n"
    C.emit(section, args.append)


if __name__ == "__main__":
    main()
