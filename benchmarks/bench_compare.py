"""Reference-model accuracy: FP32 / FP16 / INT8 per calibrator, proxy-vs-full sensitivity agreement,
and mixed precision, printed as markdown tables (issue 4's targets).

    python benchmarks/bench_compare.py --model fmnist            # ~2 min on 2 CPU cores
    python benchmarks/bench_compare.py --model minilm             # MiniLM + Rotten Tomatoes probe
    python benchmarks/bench_compare.py --model smollm --max-drop 10%

Each step is the CLI command of the same name, recorded in the run store given by --store.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PRESETS = {
    "fmnist": dict(model="examples/fmnist.py:build", data="fmnist:calib", eval="fmnist:test", metric="top1", batch_size="250",
                   max_drop="0.5"),
    "minilm": dict(model="examples/minilm.py:build", data="rotten:calib", eval="rotten:test", metric="cosine", batch_size="64",
                   max_drop="0.02"),
    "smollm": dict(model="examples/smollm.py:build", data="fortunes:calib", eval="fortunes:test", metric="perplexity",
                   batch_size="8", max_drop="10%"),
}


def _table(rows, headers):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _fmt(v):
    if isinstance(v, str):
        return v
    return "-" if v is None else f"{v:.4g}"


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from quantlab.cli.main import main as cli

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default="fmnist")
    parser.add_argument("--out", default=None, help="run folder (default runs/bench-<model>)")
    parser.add_argument("--store", default=None)
    parser.add_argument("--eval-batches", default=None, help="limit eval batches")
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--full-layers", default=None, help="layers in the full sensitivity ranking (default all)")
    parser.add_argument("--max-drop", default=None)
    parser.add_argument("--skip-full", action="store_true", help="skip the expensive full ranking")
    args = parser.parse_args()
    p = PRESETS[args.model]
    out = Path(args.out or f"runs/bench-{args.model}")
    store = ["--store", args.store] if args.store else []
    timings = {}

    t0 = time.perf_counter()
    argv = ["compare", "--model", p["model"], "--data", p["data"], "--eval", p["eval"], "--metric", p["metric"],
            "--batch-size", p["batch_size"], "--precisions", args.precisions, "--out", str(out)] + store
    if args.eval_batches:
        argv += ["--eval-batches", args.eval_batches]
    if cli(argv):
        return 1
    timings["compare"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    argv = ["sensitivity", "--run", str(out)] + ([] if args.skip_full else ["--full"]) + store
    if args.full_layers:
        argv += ["--full-layers", args.full_layers]
    if cli(argv):
        return 1
    timings["sensitivity"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cli(["autoprecision", "--run", str(out), "--max-drop", args.max_drop or p["max_drop"]] + store)
    timings["autoprecision"] = time.perf_counter() - t0

    results = json.loads((out / "results.json").read_text())
    best = results["best_calibrator"]
    print(f"\n## {args.model}: {p['model']} on {p['eval']}\n")
    metrics = list(dict.fromkeys(r["metric"] for r in results["rows"]))
    grouped = {}
    for r in results["rows"]:
        grouped.setdefault((r["precision"], r["calibrator"] or "-"), {})[r["metric"]] = r
    rows = [[prec, cal] + [f"{_fmt(c[m]['value'])} ({_fmt(c[m]['delta'])})" if m in c else "-" for m in metrics]
            + [_fmt(next(iter(c.values()))["seconds"])] for (prec, cal), c in grouped.items()]
    print(_table(rows, ["precision", "calibrator"] + [f"{m} (Δ)" for m in metrics] + ["eval s"]))
    sens = json.loads((out / f"sensitivity.{best}.json").read_text())
    print(f"\nsensitivity ({best}): cost {sens['cost_passes']:.2f} eval passes, {sens['seconds']:.0f} s")
    for name, a in (sens.get("agreement") or {}).items():
        print(f"- proxy {name} vs full ranking ({int(a['layers'])} layers): Spearman {_fmt(a['spearman'])}, "
              f"Kendall {_fmt(a['kendall'])}, top-5 overlap {_fmt(a['top_k_overlap'])}")
    mixed_path = out / f"autoprecision.{best}" / "mixed.json"
    if mixed_path.is_file():
        m = json.loads(mixed_path.read_text())
        print(f"\nmixed precision ({best}, max drop {_fmt(m['max_drop'])}): FP32 {_fmt(m['fp32'])}, INT8 {_fmt(m['int8'])}, "
              f"mixed {_fmt(m['value'])} ({'met' if m['met'] else 'not met'}) with {len(m['float_layers'])} layer(s) in FP16: "
              + ", ".join(m["float_layers"]))
    print("\ntimings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
