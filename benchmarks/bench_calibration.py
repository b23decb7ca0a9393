"""Calibration cost: quantlab vs NVIDIA Model Optimizer vs ONNX Runtime, same model, same batches.

For each model and sample count, every tool runs in its own fresh process (so
its peak RSS is its own):

* quantlab: plain FP32 inference over the batches (the physical floor), then ONE
  statistics pass and the four calibrators (max, percentile, entropy, mse) from
  the same histograms; FP32 and statistics passes alternate ``--repeats`` times.
* modelopt max: ``mtq.quantize(model, INT8_DEFAULT_CFG, forward_loop)``.
* modelopt histogram: input quantizers with ``calibrator="histogram"``; one
  statistics pass, then ``load_calib_amax(method)`` for entropy, percentile
  (99.99) and mse on every input quantizer.
* ONNX Runtime: ``create_calibrator`` on an FP32 ONNX export (the calibrator
  ``quantize_static`` uses) for MinMax, Entropy and Percentile, each with its own
  data pass (``collect_data``) and ``compute_data``.

The amax agreement is measured on the SAME histograms: quantlab's collected
``HistogramStats`` (counts and edges) are fed to Model Optimizer's
``_compute_amax_entropy`` / ``_compute_amax_percentile`` / ``_compute_amax_mse``
and compared with quantlab's calibrators, in units of the bin width.

Examples:
    .venv/bin/python benchmarks/bench_calibration.py --models fmnist --samples 512,1024
    .venv/bin/python benchmarks/bench_calibration.py --models resnet50 --samples 64,128 --batch-size 32
    python benchmarks/bench_calibration.py --device cuda --models resnet50,bert-base --samples 512,1024 --tools quantlab,modelopt
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics as st
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common as C  # noqa: E402
from _models import MODELS, make_workload, quantized_model, run_batches  # noqa: E402

QUANTLAB_CALIBRATORS = ("max", "percentile", "entropy", "mse")
HIST_METHODS = ("entropy", "percentile", "mse")
AGREEMENT_METHODS = ("entropy", "percentile", "mse", "mse-fixed")
PERCENTILE = 99.99
TOOLS = ("quantlab", "modelopt", "ort")


# ====================================================================================================
# workers (run in a fresh process each)
# ====================================================================================================
def _memory_fields(mem: C.PeakMemory) -> Dict[str, Any]:
    return {
        "host_peak": mem.host_peak,
        "host_growth": mem.host_growth,
        "device_peak": mem.device_peak,
        "process_maxrss": C.max_rss_bytes(),
    }


def worker_quantlab(args: argparse.Namespace) -> Dict[str, Any]:
    import quantlab
    from quantlab import collect_statistics
    from quantlab.api import collected_statistics
    from quantlab.cuda_graphs import graphed_forward
    from quantlab.batching import forward_loop
    from quantlab.calibrators import get_calibrator

    device = torch.device(args.device)
    if args.graph_min_batches is not None:  # where graphs start to pay: measured by forcing them
        from quantlab import cuda_graphs

        cuda_graphs.MIN_BATCHES = args.graph_min_batches
    wl = make_workload(args.model, args.samples, args.batch_size)
    # FP32 inference runs the model as the user has it: a copy without quantizers (before 2026-12-03 the
    # quantized model with its quantizers off was timed).
    model, fp32_model = quantized_model(wl, device, fp32_copy=True)

    fp32_times: List[float] = []
    fp32_graph_times: List[float] = []
    stats_times: List[float] = []
    stats_eager_times: List[float] = []
    with C.PeakMemory(device=device) as mem:
        for _ in range(args.repeats):
            fp32_times.append(C.timed(lambda: run_batches(fp32_model, wl.batches(device)), device)[0])
            if device.type == "cuda" and not args.no_cuda_graphs:  # the same forward as graphs, for reference
                with torch.no_grad(), graphed_forward(fp32_model):
                    fp32_graph_times.append(C.timed(lambda: run_batches(fp32_model, wl.batches(device)), device)[0])
            stats_times.append(C.timed(lambda: collect_statistics(model, forward_loop(wl.batches(device)),
                                                                  cuda_graphs=not args.no_cuda_graphs), device)[0])
            if device.type == "cuda" and not args.no_cuda_graphs:  # the pass never graphed, for reference
                stats_eager_times.append(C.timed(lambda: collect_statistics(model, forward_loop(wl.batches(device)),
                                                                            cuda_graphs=False), device)[0])
        calib_times: Dict[str, float] = {}
        calib_all: Dict[str, List[float]] = {}
        amax: Dict[str, Dict[str, float]] = {}
        for name in QUANTLAB_CALIBRATORS:
            runs = [C.timed(lambda: quantlab.calibrate(model, name), device) for _ in range(args.calib_repeats)]
            calib_all[name] = [seconds for seconds, _ in runs]
            calib_times[name] = st.median(calib_all[name])
            amax[name] = {e.module: float(e.amax) for e in runs[-1][1].entries if e.role == "input"}
        # As run_ptq (and `quantlab calibrate --calibrators all`) runs them: weights' ranges once.
        from quantlab.ptq import run_calibrators

        ptq_all = [C.timed(lambda: run_calibrators(model, list(QUANTLAB_CALIBRATORS)), device)[0]
                   for _ in range(args.calib_repeats)]

        from quantlab.pipeline import run as run_pipeline

        def pass_and_calibrators() -> None:  # two calls, back to back: the pass read back at its end
            collect_statistics(model, forward_loop(wl.batches(device)))
            run_calibrators(model, list(QUANTLAB_CALIBRATORS))

        from _phases import PipelineMarks

        marks = PipelineMarks(device)
        phases: List[Dict[str, float]] = []  # per watched run_ptq call: where its time went (ms)

        def as_run_ptq() -> None:  # one call (run_ptq's pipeline): the calibrators enqueued behind the pass
            run_pipeline(model, forward_loop(wl.batches(device)), list(QUANTLAB_CALIBRATORS))

        def as_run_ptq_marked() -> None:  # the same call, with host-clock marks and GPU events at its phases
            marks.start()
            run_pipeline(model, marks.loop(forward_loop(wl.batches(device))), list(QUANTLAB_CALIBRATORS))
            phases.append(marks.finish())

        def after_a_pause() -> None:  # the device idle first: does what ran before the pass matter?
            C.sync(device)
            time.sleep(0.3)

        import gc

        collections: List[List[Any]] = []  # (generation, ms) of each garbage collection inside a timed run_ptq

        def garbage_collected(phase: str, info: Dict[str, Any], clock: Dict[str, float] = {}) -> None:
            if phase == "start":
                clock["start"] = time.perf_counter()
            elif collections:
                collections[-1].append((info["generation"], (time.perf_counter() - clock["start"]) * 1e3))

        def watched(job) -> float:  # the run, with the collections and new device segments during it
            collections.append([])
            segments = torch.cuda.memory_stats(device).get("segment.all.allocated", 0) if device.type == "cuda" else 0
            gc.callbacks.append(garbage_collected)
            try:
                seconds = C.timed(job, device)[0]
            finally:
                gc.callbacks.remove(garbage_collected)
            grown = (torch.cuda.memory_stats(device).get("segment.all.allocated", 0) - segments) if device.type == "cuda" else 0
            collections[-1] = [seconds, grown, collections[-1]]
            return seconds

        def gc_paused() -> None:  # the same call with Python's cyclic garbage collector held off
            gc.disable()
            try:
                as_run_ptq()
            finally:
                gc.enable()

        fp32_beside: List[float] = []
        end_to_end: List[float] = []
        run_ptq_times: List[float] = []
        paused_times: List[float] = []
        no_gc_times: List[float] = []
        for _ in range(args.repeats):  # interleaved with FP32 inference, so host drift hits all
            fp32_beside.append(C.timed(lambda: run_batches(fp32_model, wl.batches(device)), device)[0])
            end_to_end.append(C.timed(pass_and_calibrators, device)[0])
            run_batches(fp32_model, wl.batches(device))
            with marks:
                run_ptq_times.append(watched(as_run_ptq_marked))
                after_a_pause()
                paused_times.append(watched(as_run_ptq_marked))
            run_batches(fp32_model, wl.batches(device))
            no_gc_times.append(C.timed(gc_paused, device)[0])
    result = {
        "tool": "quantlab",
        "fp32_seconds": st.median(fp32_times),
        "stats_seconds": st.median(stats_times),
        "fp32_all": fp32_times,
        "fp32_graph_all": fp32_graph_times,
        "stats_all": stats_times,
        "stats_eager_all": stats_eager_times,
        "calib_seconds": calib_times,
        "calib_all": calib_all,
        "ptq_calibrators_all": ptq_all,
        "fp32_beside_all": fp32_beside,
        "end_to_end_all": end_to_end,
        "run_ptq_all": run_ptq_times,
        "run_ptq_paused_all": paused_times,
        "run_ptq_no_gc_all": no_gc_times,
        "run_ptq_watched": collections,
        "run_ptq_phases": phases,
        "amax": amax,
        **_memory_fields(mem),
    }
    stats = collected_statistics(model)
    result["num_tensors"] = len(stats)
    result["bins"] = [int(s.num_bins) for s in stats.values()]
    if args.compare_per_tensor:
        result["per_tensor"] = batched_vs_per_tensor(list(stats.values()), device, args.calib_repeats)
    if not args.no_agreement:
        result["agreement"] = same_histogram_agreement(stats, get_calibrator, args.agree_tensors)
    return result


def batched_vs_per_tensor(stats: List[Any], device: torch.device, repeats: int) -> Dict[str, Any]:
    """The collected histograms through today's per-tensor loop and through choose_many: time and bits."""
    from quantlab.calibrators import choose_many, get_batched_calibrator, get_calibrator
    from quantlab.calibrators import many as many_module

    out: Dict[str, Any] = {}
    for name in QUANTLAB_CALIBRATORS:
        fn = get_calibrator(name)
        per = [C.timed(lambda: [fn(s) for s in stats], device) for _ in range(repeats)]
        batch = [C.timed(lambda: choose_many(name, stats), device) for _ in range(repeats)]
        want, got = per[-1][1], batch[-1][1]
        out[name] = {
            "per_tensor_all": [t for t, _ in per],
            "batched_all": [t for t, _ in batch],
            "identical": sum(float(a).hex() == float(b).hex() for a, b in zip(got, want)),
            "tensors": len(stats),
            "left_to_per_tensor": sum(a is None for a in get_batched_calibrator(name)(stats)),
        }
    budget = many_module.ACCELERATOR_CHUNK_ELEMENTS
    sweep: Dict[str, Dict[str, float]] = {}
    try:  # chunk size: launches vs memory traffic
        for shift in (21, 22, 23, 24, 25):
            many_module.ACCELERATOR_CHUNK_ELEMENTS = 1 << shift
            sweep[str(shift)] = {name: st.median(C.timed(lambda: choose_many(name, stats), device)[0] for _ in range(3))
                                 for name in ("entropy", "mse")}
    finally:
        many_module.ACCELERATOR_CHUNK_ELEMENTS = budget
    out["chunk_sweep"] = sweep
    return out


def same_histogram_agreement(stats: Dict[str, Any], get_calibrator, limit: Optional[int]) -> Dict[str, Any]:
    """quantlab's calibrators vs Model Optimizer's amax functions on quantlab's histograms."""
    try:
        with C.quiet_warnings():
            from modelopt.torch.quantization.calib import histogram as mo_hist
    except ImportError as exc:
        return {"error": f"nvidia-modelopt not importable: {exc}"}
    names = list(stats)[:limit] if limit else list(stats)
    out: Dict[str, Any] = {}
    shipped_fake_quant = mo_hist.fake_tensor_quant

    def fixed_fake_quant(x, amax, num_bits=8, unsigned=False):
        # nvidia-modelopt 0.47's _compute_amax_mse calls fake_tensor_quant(centers, amax, num_bits,
        # unsigned), but the function's third parameter is now `bias`: num_bits lands in bias and
        # the grid collapses. "mse-fixed" runs the same search with the arguments where they belong.
        return shipped_fake_quant(x, amax, None, num_bits, unsigned)

    for method in AGREEMENT_METHODS:
        fn = get_calibrator(method.split("-")[0])
        mo_hist.fake_tensor_quant = fixed_fake_quant if method == "mse-fixed" else shipped_fake_quant
        rows = []
        ours_s = theirs_s = 0.0
        for name in names:
            s = stats[name]
            counts = s.counts.detach().cpu().numpy()
            edges = s.edges(torch.float64).cpu().numpy()
            t0 = time.perf_counter()
            ours = float(fn(s, percentile=PERCENTILE) if method == "percentile" else fn(s))
            t1 = time.perf_counter()
            with C.quiet_warnings():
                if method == "entropy":
                    theirs = mo_hist._compute_amax_entropy(counts.copy(), edges, 8, False, 1, 128)
                elif method.startswith("mse"):
                    theirs = mo_hist._compute_amax_mse(counts.copy(), edges, 8, False, 1, 128)
                else:
                    theirs = mo_hist._compute_amax_percentile(counts.copy(), edges, PERCENTILE)
            t2 = time.perf_counter()
            ours_s += t1 - t0
            theirs_s += t2 - t1
            theirs = float(theirs)
            rows.append((name, ours, theirs, (ours - theirs) / s.bin_width, s.bin_width))
        diffs = [abs(r[3]) for r in rows]
        rels = [abs(r[1] - r[2]) / max(abs(r[2]), 1e-30) for r in rows]
        out[method] = {
            "tensors": len(rows),
            "max_bins": max(diffs),
            "median_bins": st.median(diffs),
            "signed_bins": sorted({round(r[3], 3) for r in rows}),
            "max_rel": max(rels),
            "median_rel": st.median(rels),
            "within_one_bin": sum(d <= 1.0 + 1e-9 for d in diffs),
            "quantlab_seconds": ours_s,
            "modelopt_seconds": theirs_s,
            "worst": max(rows, key=lambda r: abs(r[3]))[:4],
        }
    mo_hist.fake_tensor_quant = shipped_fake_quant
    return out


def _modelopt_config(histogram: bool) -> Dict[str, Any]:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    if histogram:
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*input_quantizer" and "cfg" in entry:
                entry["cfg"] = dict(entry["cfg"], calibrator="histogram")
        cfg["algorithm"] = None  # insert quantizers only; calibration is driven below
    return cfg


def _input_amax(model: torch.nn.Module) -> Dict[str, float]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and name.endswith(".input_quantizer") and not module._disabled:
            amax = getattr(module, "amax", None)
            if amax is not None and amax.numel() == 1:
                out[name[: -len(".input_quantizer")]] = float(amax)
    return out


def _modelopt_kernels(device: torch.device, build: bool) -> float:
    """Decides how Model Optimizer fake-quantizes on the GPU; returns the one-off build time.

    Its CUDA extension is JIT-compiled on first use (minutes). Calibration itself
    needs it only inside ``_compute_amax_mse``; without it Model Optimizer uses
    its pure-PyTorch fake quantization (its documented fallback). ``build=True``
    compiles it before any timing instead.
    """
    if device.type != "cuda":
        return 0.0
    from modelopt.torch.quantization import extensions

    if not build:
        extensions.get_cuda_ext.extension = None  # the "extension unavailable" fallback
        return 0.0
    from modelopt.torch.quantization.tensor_quant import fake_tensor_quant

    x = torch.randn(1024, device=device)
    seconds, _ = C.timed(lambda: fake_tensor_quant(x, x.abs().max()), device)
    return seconds


def worker_modelopt(args: argparse.Namespace) -> Dict[str, Any]:
    with C.quiet_warnings():
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.calib import HistogramCalibrator
        from modelopt.torch.quantization.model_calib import enable_stats_collection
        from modelopt.torch.quantization.nn import TensorQuantizer

    device = torch.device(args.device)
    wl = make_workload(args.model, args.samples, args.batch_size)
    model = wl.build().to(device)
    run_batches(model, iter([next(iter(wl.batches(device)))]))
    ext_seconds = _modelopt_kernels(device, args.modelopt_cuda_ext)

    def loop(m: torch.nn.Module) -> None:
        run_batches(m, wl.batches(device))

    if args.tool == "modelopt-max":
        with C.quiet_warnings(), C.PeakMemory(device=device) as mem:
            seconds, _ = C.timed(lambda: mtq.quantize(model, _modelopt_config(False), loop), device)
        return {"tool": "modelopt-max", "total_seconds": seconds, "amax": {"max": _input_amax(model)},
                "ext_build_seconds": ext_seconds, **_memory_fields(mem)}

    with C.quiet_warnings():
        mtq.quantize(model, _modelopt_config(True), None)  # insert quantizers, no calibration
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer) and not m._disabled]
    hist = [q for q in quantizers if isinstance(getattr(q, "_calibrator", None), HistogramCalibrator)]
    others = [q for q in quantizers if q not in hist and getattr(q, "_calibrator", None) is not None]
    calib_times: Dict[str, float] = {}
    amax: Dict[str, Dict[str, float]] = {}
    with C.quiet_warnings(), C.PeakMemory(device=device) as mem:
        def statistics_pass() -> None:
            enable_stats_collection(model)
            with torch.no_grad():
                model.eval()
                loop(model)
            for q in others:  # weights: max calibrator, as mtq's own flow does
                q.load_calib_amax()

        stats_seconds, _ = C.timed(statistics_pass, device)
        for method in HIST_METHODS:
            kwargs = {"percentile": PERCENTILE} if method == "percentile" else {}
            seconds, _ = C.timed(lambda: [q.load_calib_amax(method, **kwargs) for q in hist], device)
            calib_times[method] = seconds
            amax[method] = _input_amax(model)
        for q in quantizers:
            q.enable_quant()
            q.disable_calib()
    return {"tool": "modelopt-hist", "stats_seconds": stats_seconds, "calib_seconds": calib_times, "amax": amax,
            "num_tensors": len(hist), "bins": [int(q._calibrator._calib_hist.numel()) for q in hist],
            "ext_build_seconds": ext_seconds, **_memory_fields(mem)}


def worker_ort(args: argparse.Namespace) -> Dict[str, Any]:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry

    from _models import export_onnx

    method = {"ort-minmax": CalibrationMethod.MinMax, "ort-entropy": CalibrationMethod.Entropy,
              "ort-percentile": CalibrationMethod.Percentile}[args.tool]
    wl = make_workload(args.model, args.samples, args.batch_size)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = wl.numpy_batches()

        def get_next(self):
            return next(self._it, None)

    extra: Dict[str, Any] = {"symmetric": True}
    if method is CalibrationMethod.Entropy:
        extra.update(num_bins=args.ort_bins, num_quantized_bins=128)
    elif method is CalibrationMethod.Percentile:
        extra.update(num_bins=args.ort_bins, percentile=PERCENTILE)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "model.onnx")
        with C.quiet_warnings():
            export_onnx(wl.build(), wl.example(), wl.input_names, fp32)
        with C.PeakMemory() as mem:
            # The op types quantize_static calibrates by default (QDQ format).
            calibrator = create_calibrator(
                Path(fp32), list(QDQRegistry.keys()), augmented_model_path=os.path.join(tmp, "augmented.onnx"),
                calibrate_method=method, use_external_data_format=False,
                providers=["CPUExecutionProvider"], extra_options=extra,
            )
            collect_seconds, _ = C.timed(lambda: calibrator.collect_data(Reader()))
            compute_seconds, ranges = C.timed(calibrator.compute_data)
    return {"tool": args.tool, "stats_seconds": collect_seconds, "calib_seconds": {args.tool: compute_seconds},
            "num_tensors": len(ranges.data), "ort_version": ort.__version__,
            **_memory_fields(mem)}


# ====================================================================================================
# driver
# ====================================================================================================
def _rel_diffs(ours: Dict[str, float], theirs: Dict[str, float]) -> Optional[tuple]:
    common = [k for k in ours if k in theirs and theirs[k] > 0]
    if not common:
        return None
    rel = [abs(ours[k] - theirs[k]) / theirs[k] for k in common]
    return st.median(rel), max(rel), len(common)


def _fmt_rel(r: Optional[tuple]) -> str:
    return "-" if r is None else f"{r[0]:.2%} / {r[1]:.2%} (n={r[2]})"


def run(args: argparse.Namespace) -> str:
    script = Path(__file__).resolve()
    device = C.setup_torch(args)
    sample_counts = [int(s) for s in args.samples.split(",")]
    tools: List[str] = []
    for t in args.tools.split(","):
        tools += {"quantlab": ["quantlab"], "modelopt": ["modelopt-max", "modelopt-hist"],
                  "ort": ["ort-minmax", "ort-entropy", "ort-percentile"]}.get(t.strip(), [t.strip()])
    sections = [C.machine_header("Calibration cost: quantlab vs Model Optimizer vs ONNX Runtime", {
        "device": str(device), "batch size": args.batch_size, "repeats": args.repeats,
        "ORT histogram bins": args.ort_bins, "percentile": PERCENTILE,
    })]
    if device.type == "cpu":
        sections.append(C.CPU_NOISE_NOTE + "\n")
    print("\n".join(sections), flush=True)
    memory_rows = []
    for model_name in args.models.split(","):
        for samples in sample_counts:
            common = ["--model", model_name, "--samples", str(samples), "--batch-size", str(args.batch_size),
                      "--device", args.device, "--repeats", str(args.repeats), "--ort-bins", str(args.ort_bins)]
            if args.threads:
                common += ["--threads", str(args.threads)]
            if args.modelopt_cuda_ext:
                common += ["--modelopt-cuda-ext"]
            if args.no_cuda_graphs:
                common += ["--no-cuda-graphs"]
            if args.graph_min_batches is not None:
                common += ["--graph-min-batches", str(args.graph_min_batches)]
            common += ["--calib-repeats", str(args.calib_repeats)]
            if args.compare_per_tensor and samples == sample_counts[0]:  # the same histograms' shapes: once per model
                common += ["--compare-per-tensor"]
            if args.agree_tensors:
                common += ["--agree-tensors", str(args.agree_tensors)]
            if samples != sample_counts[0] or args.no_agreement:
                common += ["--no-agreement"]  # agreement once per model is enough
            results: Dict[str, Dict[str, Any]] = {}
            for tool in tools:
                if tool.startswith("ort") and device.type != "cpu":
                    continue  # ORT calibration runs on the CPU (the peer the target names)
                print(f"[{model_name} x{samples}] {tool} ...", file=sys.stderr, flush=True)
                results[tool] = C.run_worker(script, ["--tool", tool, *common], timeout=args.timeout)
                if "error" in results[tool]:
                    print(results[tool]["error"], file=sys.stderr)
            sections.append(_section(model_name, samples, results, device))
            print(sections[-1], flush=True)  # partial results survive an outer timeout
            q = results.get("quantlab", {})
            if "host_growth" in q:
                memory_rows.append([model_name, samples, C.mib(q["host_growth"]), C.mib(q["host_peak"]),
                                    C.mib(q.get("device_peak"))])
            for tool in ("ort-entropy", "modelopt-hist"):
                r = results.get(tool, {})
                if "host_growth" in r:
                    memory_rows.append([f"{model_name} ({tool})", samples, C.mib(r["host_growth"]),
                                        C.mib(r["host_peak"]), C.mib(r.get("device_peak"))])
    if memory_rows:
        sections.append("### Host memory vs number of samples (growth of RSS during the tool's run)\n\n" + C.markdown_table(
            ["model (tool)", "samples", "RSS growth MiB", "RSS peak MiB", "device peak MiB"], memory_rows))
        print(sections[-1], flush=True)
    return "\n".join(sections)


def _spread(values: List[float], scale: float = 1.0) -> str:
    """min / median / max."""
    return f"{min(values) * scale:.4g} / {st.median(values) * scale:.4g} / {max(values) * scale:.4g}"


def _phase_table(phases: List[Dict[str, float]], watched: List[List[Any]]) -> str:
    """The watched run_ptq calls side by side, slowest first: which phase a slow call lost its time in."""
    order = sorted(range(len(phases)), key=lambda i: -phases[i].get("host: total", 0.0))
    names = list(phases[0]) if phases else []
    header = ["phase, ms"] + [f"run {i + 1}" for i in order]
    rows = [[name] + [f"{phases[i].get(name, float('nan')):.2f}" for i in order] for name in names]
    if watched and len(watched) == len(phases):
        rows.append(["timed (s), with syncs"] + [f"{watched[i][0]:.4f}" for i in order])
    return ("\n- Phases of each watched run_ptq call (in run order: odd right after FP32 inference, even after 0.3 s "
            "idle), slowest first:\n\n" + C.markdown_table(header, rows))


def _section(model_name: str, samples: int, results: Dict[str, Dict[str, Any]], device: torch.device) -> str:
    out = [f"### {model_name}, {samples} samples, {device}\n"]
    rows = []
    q = results.get("quantlab", {})
    q_amax = q.get("amax", {})
    for tool, r in results.items():
        if "error" in r:
            rows.append([tool, "error", None, None, None, None, None, None, r["error"][-200:].replace("\n", " ").replace("|", "/")])
            continue
        mem = [C.mib(r.get("process_maxrss")), C.mib(r.get("host_growth")), C.mib(r.get("device_peak"))]
        if tool == "quantlab":
            total = r["stats_seconds"] + sum(r["calib_seconds"].values())
            rows.append(["quantlab", "statistics pass", r["stats_seconds"], None, None, *mem, f"{r['num_tensors']} tensors, bins {min(r['bins'])}-{max(r['bins'])}; runs {_spread(r['stats_all'])}"])
            for name, s in r["calib_seconds"].items():
                rows.append(["quantlab", name, None, s, None, "", "", "", f"runs {_spread(r.get('calib_all', {}).get(name, [s]))}"])
            rows.append(["quantlab", "**all four**", r["stats_seconds"], sum(r["calib_seconds"].values()), total, "", "", "", ""])
            if r.get("ptq_calibrators_all"):
                ptq = st.median(r["ptq_calibrators_all"])
                rows.append(["quantlab", "**all four, as run_ptq**", r["stats_seconds"], ptq, r["stats_seconds"] + ptq, "", "", "",
                             f"weights' ranges once; runs {_spread(r['ptq_calibrators_all'])}"])
        elif tool == "modelopt-max":
            rel = _rel_diffs(q_amax.get("max", {}), r["amax"]["max"])
            rows.append([tool, "max (mtq.quantize)", None, None, r["total_seconds"], *mem, f"amax vs quantlab med/max rel: {_fmt_rel(rel)}"])
        elif tool == "modelopt-hist":
            rows.append([tool, "statistics pass", r["stats_seconds"], None, None, *mem, f"{r['num_tensors']} tensors, bins {min(r['bins'])}-{max(r['bins'])}"])
            for method, s in r["calib_seconds"].items():
                rel = _rel_diffs(q_amax.get(method, {}), r["amax"][method])
                rows.append([tool, method, None, s, r["stats_seconds"] + s, "", "", "", f"amax vs quantlab (own histograms) med/max rel: {_fmt_rel(rel)}"])
        else:
            (name, s), = r["calib_seconds"].items()
            rows.append([tool, "collect + compute", r["stats_seconds"], s, r["stats_seconds"] + s, *mem, f"{r['num_tensors']} tensors"])
    out.append(C.markdown_table(["tool", "step", "data pass s", "calibrate s", "total s", "process peak RSS MiB",
                                 "RSS growth MiB", "device peak MiB", "notes"], rows))
    if "stats_seconds" in q:
        ours = q["stats_seconds"] + sum(q["calib_seconds"].values())
        lines = [
            f"- Physical floor: FP32 inference {q['fp32_seconds']:.3f} s vs quantlab statistics pass {q['stats_seconds']:.3f} s "
            f"= **{q['stats_seconds'] / q['fp32_seconds']:.2f}x**; all four calibrators included (four `calibrate` calls): "
            f"{ours / q['fp32_seconds']:.2f}x (target <= 1.3x). (runs: FP32 {', '.join(f'{t:.3f}' for t in q['fp32_all'])}; "
            f"statistics {', '.join(f'{t:.3f}' for t in q['stats_all'])})",
        ]
        if q.get("ptq_calibrators_all"):
            ptq = q["stats_seconds"] + st.median(q["ptq_calibrators_all"])
            lines.append(f"- Statistics pass + all four calibrators as run_ptq runs them: {ptq:.3f} s = "
                         f"**{ptq / q['fp32_seconds']:.2f}x** FP32 inference (target <= 1.3x)")
        if q.get("end_to_end_all"):
            e2e, base = st.median(q["end_to_end_all"]), st.median(q["fp32_beside_all"])
            lines.append(f"- **End to end** (pass + four calibrators in one timed region, interleaved with FP32 inference): "
                         f"{e2e:.4f} s vs FP32 {base:.4f} s = **{e2e / base:.2f}x** (target <= 1.3x; runs "
                         f"{', '.join(f'{t:.4f}' for t in q['end_to_end_all'])}; FP32 {', '.join(f'{t:.4f}' for t in q['fp32_beside_all'])})")
        if q.get("run_ptq_all"):
            base = st.median(q["fp32_beside_all"])
            for key, label in (("run_ptq_all", "right after FP32 inference"), ("run_ptq_paused_all", "after 0.3 s idle"),
                               ("run_ptq_no_gc_all", "right after FP32 inference, Python's GC held off")):
                t = st.median(q[key])
                lines.append(f"- **As run_ptq runs it** (one pipeline call: the calibrators enqueued behind the pass, "
                             f"the statistics read back with the first ranges), {label}: {t:.4f} s = **{t / base:.2f}x** FP32 (target <= 1.3x; runs "
                             f"{', '.join(f'{v:.4f}' for v in q[key])})")
        if q.get("run_ptq_watched"):
            lines.append("- Garbage collections and new device segments inside each watched run_ptq call (seconds, "
                         "segments, [(generation, ms)]): " + "; ".join(
                             f"{w[0]:.4f} s, {w[1]} seg, {[(g, round(ms, 1)) for g, ms in w[2]]}" for w in q["run_ptq_watched"]))
        if q.get("run_ptq_phases"):
            lines.append(_phase_table(q["run_ptq_phases"], q.get("run_ptq_watched") or []))
        for name, c in (q.get("per_tensor") or {}).items():
            if name == "chunk_sweep":
                lines.append("- choose_many seconds by chunk size (2^k elements), entropy / mse: " + "; ".join(
                    f"2^{k}: {v['entropy'] * 1e3:.1f} / {v['mse'] * 1e3:.1f} ms" for k, v in c.items()))
                continue
            lines.append(f"- {name} on these {c['tensors']} histograms: per-tensor loop {_spread(c['per_tensor_all'], 1e3)} ms, "
                         f"choose_many {_spread(c['batched_all'], 1e3)} ms (min/median/max); identical amax "
                         f"{c['identical']}/{c['tensors']}; left to the per-tensor form {c['left_to_per_tensor']}")
        if q.get("stats_eager_all"):
            eager = st.median(q["stats_eager_all"])
            lines.append(f"- Statistics pass never graphed (`cuda_graphs=False`, for reference): {eager:.3f} s = "
                         f"{eager / q['fp32_seconds']:.2f}x FP32 inference (runs: {', '.join(f'{t:.3f}' for t in q['stats_eager_all'])})")
        if q.get("fp32_graph_all"):
            graphed = st.median(q["fp32_graph_all"])
            lines.append(f"- FP32 inference replayed as CUDA graphs (for reference): {graphed:.3f} s; statistics pass / that "
                         f"= {q['stats_seconds'] / graphed:.2f}x (runs: {', '.join(f'{t:.3f}' for t in q['fp32_graph_all'])})")
        mh = results.get("modelopt-hist", {})
        if "calib_seconds" in mh:
            for method in HIST_METHODS:
                theirs = mh["stats_seconds"] + mh["calib_seconds"][method]
                lines.append(f"- vs Model Optimizer histogram + {method} only ({theirs:.2f} s): quantlab with all four is **{theirs / ours:.1f}x** faster")
        oe = results.get("ort-entropy", {})
        if "calib_seconds" in oe:
            theirs = oe["stats_seconds"] + sum(oe["calib_seconds"].values())
            lines.append(f"- vs ONNX Runtime Entropy ({theirs:.2f} s, CPU): quantlab with all four is **{theirs / ours:.1f}x** faster (target >= 20x)")
        out.append("\n".join(lines) + "\n")
    agreement = q.get("agreement")
    if agreement:
        if "error" in agreement:
            out.append(f"Same-histogram amax agreement not measured: {agreement['error']}\n")
        else:
            rows = []
            for method, a in agreement.items():
                rows.append([method, a["tensors"], a["within_one_bin"], a["max_bins"], a["median_bins"], a["max_rel"], a["median_rel"],
                             a["quantlab_seconds"], a["modelopt_seconds"], ", ".join(str(v) for v in a["signed_bins"][:6])])
            out.append("Same histograms (quantlab's counts/edges fed to Model Optimizer's `_compute_amax_*`), "
                       f"percentile {PERCENTILE}, start_bin 128, stride 1:\n\n" + C.markdown_table(
                           ["method", "tensors", "within 1 bin", "max |diff| bins", "median |diff| bins", "max rel", "median rel",
                            "quantlab s", "modelopt s", "distinct signed diffs (bins)"], rows))
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--models", default="fmnist", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--samples", default="512,1024", help="comma list of calibration sample counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tools", default="quantlab,modelopt,ort", help="comma list of quantlab, modelopt, ort")
    parser.add_argument("--repeats", type=int, default=1, help="alternating FP32 / statistics passes (median)")
    parser.add_argument("--calib-repeats", type=int, default=3, help="timed runs of each calibrator (median)")
    parser.add_argument("--compare-per-tensor", action="store_true",
                        help="quantlab: also time today's per-tensor loop vs choose_many on the collected histograms (and check bits)")
    parser.add_argument("--ort-bins", type=int, default=2048, help="ORT entropy/percentile bins (ORT's entropy default is 128)")
    parser.add_argument("--agree-tensors", type=int, default=0, help="limit the same-histogram check to N tensors (0: all)")
    parser.add_argument("--no-agreement", action="store_true")
    parser.add_argument("--modelopt-cuda-ext", action="store_true",
                        help="JIT-build Model Optimizer's CUDA fake-quant extension (untimed) instead of its PyTorch fallback")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="quantlab: run the statistics pass eagerly (no CUDA-graph replay)")
    parser.add_argument("--graph-min-batches", type=int, default=None,
                        help="quantlab: graph passes of at least this many batches (default quantlab.cuda_graphs.MIN_BATCHES)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per tool process")
    # worker-only
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        C.setup_torch(args)
        args.samples = int(args.samples)
        fn = {"quantlab": worker_quantlab, "modelopt-max": worker_modelopt, "modelopt-hist": worker_modelopt}.get(
            args.tool, worker_ort)
        C.worker_result(fn(args))
        return
    section = run(args)  # printed as it goes
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n" + section.rstrip() + "\n")


if __name__ == "__main__":
    main()
