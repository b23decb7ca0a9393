"""How well each SQNR proxy ranks layers like the full (expensive) metric ranking.

Reads the full everything-but-one ranking saved by ``quantlab sensitivity --full``
in a compare run folder, re-measures the per-layer SQNR proxies on the same
proxy batches with the current code, and prints a markdown table of Spearman /
Kendall tau-b / top-5 overlap per proxy::

    quantlab sensitivity --run runs/minilm --full
    python benchmarks/bench_proxy_agreement.py --run runs/minilm
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from quantlab.evaluation.layers import layer_errors
    from quantlab.jobs.runs import calibrator_of, load_run_info, quantized_copy, rebuild, sensitivity_path
    from quantlab.evaluation.sensitivity import PROXIES, proxy_agreement

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="compare run folder (or id) with a sensitivity.<calibrator>.json from --full")
    parser.add_argument("--calibrator", default=None)
    parser.add_argument("--store", default=None)
    parser.add_argument("--proxy-batches", type=int, default=None, help="default: what the sensitivity run used (2, or 1 for < 4 batches)")
    args = parser.parse_args()

    info = load_run_info(args.run, args.store)
    calibrator = calibrator_of(info, args.calibrator)
    saved = json.loads(Path(sensitivity_path(info["run_dir"], calibrator)).read_text())
    full = saved.get("full_ranking")
    if not full:
        print(f"{sensitivity_path(info['run_dir'], calibrator)} has no full ranking: run `quantlab sensitivity --full` first", file=sys.stderr)
        return 1
    model, batches, task, metric, _ = rebuild(info)
    quant = quantized_copy(model, info, calibrator)
    proxy_batches = args.proxy_batches or (2 if len(batches) >= 4 else 1)
    start = time.perf_counter()
    errors = layer_errors(model, quant, batches[:proxy_batches], inputs_of=task.inputs)
    seconds = time.perf_counter() - start
    print(f"\n{info['model']} ({calibrator}), metric {metric}: full ranking of {len(full)} layers on "
          f"{saved['subset_batches']}/{saved['total_batches']} eval batches; proxies from {proxy_batches} batch(es) in {seconds:.1f} s\n")
    print("| proxy | Spearman | Kendall tau-b | top-5 overlap |")
    print("|---|---|---|---|")
    for key in PROXIES:
        a = proxy_agreement(errors, full, key=key)
        print(f"| {key} | {a['spearman']:.3f} | {a['kendall']:.3f} | {a['top_k_overlap']:.2f} |")
    best = sorted(full, key=lambda n: -full[n])[:5]
    by_layer = {e.layer: e for e in errors}
    print("\nmost sensitive by the full ranking: " + ", ".join(
        f"{n} ({full[n]:+.4g}; proxy {by_layer[n].proxy_db:.1f} dB)" for n in best if n in by_layer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
