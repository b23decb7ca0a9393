"""The statistics kernel's launch settings, side by side on a model's real activations (CUDA only).

Per variant (loads in flight per thread, blocks per SM, fewest elements per block, the
warp's vote on values above the range per group of loads or per value, the load instruction):
the kernel time of one batch's activations (every quantized input of the model, in
forward order, cold in L2), its effective bandwidth, and whether its counts equal the
first variant's bit for bit. With ``--passes``, whole statistics passes with each
variant, interleaved with FP32 inference (each variant on its own copy of the model).

    python benchmarks/bench_histogram_kernel.py --device cuda --model resnet50 --passes
"""
from __future__ import annotations

import argparse
import statistics as st
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from _models import make_workload, quantized_model, run_batches  # noqa: E402

Variant = Tuple[int, int, int, int, int]
LOADS = {0: "plain", 1: "__ldg", 2: "__ldcs"}


def parse_variants(text: str) -> List[Variant]:
    """``"1:2:2048:0:0,4:2:2048:1:0"`` -> [(unroll, blocks per SM, min elements per block, group vote, load), ...]."""
    out = []
    for item in text.split(","):
        unroll, per_sm, min_elements, vote, load = (int(v) for v in item.split(":"))
        out.append((unroll, per_sm, min_elements, vote, load))
    return out


_COMPILED: Dict[Tuple[torch.device, Variant], Any] = {}


def kernels_of(device: torch.device, variant: Variant) -> Any:
    """The variant's kernels, compiled once (NVRTC takes a second or two)."""
    from quantlab.kernels import histogram_cuda as H

    if (device, variant) not in _COMPILED:
        unroll, per_sm, min_elements, vote, load = variant
        _COMPILED[device, variant] = H.HistogramKernels(
            device, unroll=unroll, blocks_per_sm=per_sm, min_elements_per_block=min_elements, group_vote=bool(vote),
            load=load)
    return _COMPILED[device, variant]


def label(variant: Variant) -> str:
    unroll, per_sm, min_elements, vote, load = variant
    return (f"unroll {unroll}, {per_sm} blocks/SM, >= {min_elements} elements/block, vote per "
            f"{'group' if vote else 'value'}, {LOADS[load]} loads")


def activations(model: torch.nn.Module, batch: Any) -> List[torch.Tensor]:
    """The inputs of every Conv/Linear in one forward (the tensors the pass counts)."""
    seen: List[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        run_batches(model, iter([batch]))
    for h in hooks:
        h.remove()
    return [t.contiguous() for t in seen]


def fresh_state(kernels: Any, device: torch.device) -> Tuple[Any, torch.Tensor]:
    """An empty statistics state of 2 x 2048 bins (the default) bound to ``kernels``, and its counts."""
    from quantlab.kernels import histogram_cuda as H
    from quantlab.statistics import _MAX_EXPONENT, _MIN_EXPONENT

    amax = torch.zeros((), dtype=torch.float32, device=device)
    exponent = torch.full((), _MIN_EXPONENT, dtype=torch.int32, device=device)
    counts = torch.zeros(4096, dtype=torch.float64, device=device)
    return H.FusedHistogram(kernels, amax, exponent, counts, 12, _MIN_EXPONENT, _MAX_EXPONENT), counts


def kernel_table(tensors: List[torch.Tensor], variants: List[Variant], repeats: int) -> List[List[Any]]:
    device = tensors[0].device
    total_bytes = sum(t.numel() * t.element_size() for t in tensors)
    rows, reference = [], None
    read_ms = C.median_time(lambda: [t.amax() for t in tensors], repeats=repeats, warmup=2, device=device) * 1e3
    rows.append(["reference: torch amax of each tensor (one read)", "", f"{read_ms:.3f}",
                 f"{total_bytes / read_ms / 1e6:.0f}", ""])
    for variant in variants:
        try:
            kernels = kernels_of(device, variant)
        except Exception as error:  # a variant that does not compile: say so, measure the others
            rows.append([label(variant), "", "", "", f"FAILED: {str(error)[:200]}"])
            continue
        states = [fresh_state(kernels, device) for _ in tensors]
        for (fused, _), t in zip(states, tensors):
            fused.update(t, first=True)

        def one_batch() -> None:
            for (fused, _), t in zip(states, tensors):
                fused.update(t, first=False)

        ms = C.median_time(one_batch, repeats=repeats, warmup=2, device=device) * 1e3
        # Same updates from a fresh state: counts must not depend on the launch settings.
        for (fused, counts), t in zip(states, tensors):
            fused.update(t, first=True)
            fused.update(t, first=False)
        snapshot = torch.stack([c.clone() for _, c in states]).cpu()
        if reference is None:
            reference = snapshot
        same = "identical" if torch.equal(snapshot, reference) else "DIFFERENT"
        rows.append([label(variant), kernels.blocks, f"{ms:.3f}", f"{total_bytes / ms / 1e6:.0f}", same])
    return rows


def per_tensor_table(tensors: List[torch.Tensor], variants: List[Variant], repeats: int) -> List[List[Any]]:
    """Per activation size: the kernel's time with each variant (microseconds)."""
    device = tensors[0].device
    by_size: Dict[int, torch.Tensor] = {}
    for t in tensors:
        by_size.setdefault(t.numel(), t)
    rows = []
    for n, t in sorted(by_size.items()):
        row: List[Any] = [f"{n * 4 / 1e6:.1f} MB", sum(1 for u in tensors if u.numel() == n)]
        row.append(f"{C.median_time(lambda: t.amax(), repeats=repeats, warmup=2, device=device) * 1e6:.1f}")
        for variant in variants:
            try:
                kernels = kernels_of(device, variant)
            except Exception:  # reported in the first table
                row.append("-")
                continue
            fused, _ = fresh_state(kernels, device)
            fused.update(t, first=True)
            row.append(f"{C.median_time(lambda: fused.update(t, first=False), repeats=repeats, warmup=2, device=device) * 1e6:.1f}")
        rows.append(row)
    return rows


def pass_table(args: argparse.Namespace, device: torch.device, variants: List[Variant]) -> List[List[Any]]:
    """Whole statistics passes with each variant, interleaved with FP32 inference (seconds)."""
    import quantlab
    from quantlab import collect_statistics
    from quantlab.batching import forward_loop
    from quantlab.kernels import histogram_cuda as H

    wl = make_workload(args.model, args.samples, args.batch_size)
    index = device.index if device.index is not None else torch.cuda.current_device()
    models = []
    variants = list(variants)
    for variant in list(variants):
        try:
            H._CACHE[index] = kernels_of(device, variant)
        except Exception:  # reported in the first table
            variants.remove(variant)
            continue
        model, _ = quantized_model(wl, device)
        collect_statistics(model, forward_loop(wl.batches(device)))  # binds this variant's kernels
        models.append(model)
    H._CACHE.pop(index, None)
    fp32: List[float] = []
    passes: List[List[float]] = [[] for _ in variants]
    for _ in range(args.pass_repeats):
        with quantlab.quantization_disabled(models[0]):
            fp32.append(C.timed(lambda: run_batches(models[0], wl.batches(device)), device)[0])
        for model, times in zip(models, passes):
            times.append(C.timed(lambda: collect_statistics(model, forward_loop(wl.batches(device))), device)[0])
    f = st.median(fp32)
    rows = [["FP32 inference", f"{min(fp32):.4f} / {f:.4f} / {max(fp32):.4f}", "1.00x"]]
    for variant, times in zip(variants, passes):
        m = st.median(times)
        rows.append([f"statistics pass: {label(variant)}", f"{min(times):.4f} / {m:.4f} / {max(times):.4f}", f"{m / f:.3f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    C.add_common_args(parser)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", default="1:2:2048:0:0,4:2:2048:1:0,4:2:2048:1:1,4:2:2048:1:2,4:1:2048:1:2,8:2:2048:1:2")
    parser.add_argument("--passes", action="store_true", help="also whole statistics passes per variant")
    parser.add_argument("--pass-variants", default="1:2:2048:0:0,4:2:2048:1:0,4:2:2048:1:2")
    parser.add_argument("--pass-repeats", type=int, default=7)
    args = parser.parse_args()
    device = C.setup_torch(args)
    if device.type != "cuda":
        raise SystemExit("the statistics kernel runs on CUDA devices only")
    variants = parse_variants(args.variants)
    wl = make_workload(args.model, args.batch_size, args.batch_size)
    model = wl.build().to(device)
    tensors = activations(model, next(iter(wl.batches(device))))
    del model
    out = [C.machine_header("Statistics kernel launch settings", {"model": args.model, "batch": args.batch_size,
                                                                  "tensors": len(tensors)})]
    out.append("### One batch of every activation (ms, median of repeats; GB/s = bytes read / time)\n\n" + C.markdown_table(
        ["variant", "max blocks", "ms per batch", "GB/s", "counts vs first variant"], kernel_table(tensors, variants, args.repeats)))
    out.append("### Per activation size (us per launch)\n\n" + C.markdown_table(
        ["size", "tensors", "amax (read)"] + [":".join(map(str, v)) for v in variants],
        per_tensor_table(tensors, variants, args.repeats)))
    del tensors
    torch.cuda.empty_cache()
    if args.passes:
        out.append(f"### Statistics passes, {args.model}, {args.samples} samples, batch {args.batch_size} "
                   f"(seconds min / median / max of {args.pass_repeats}, interleaved)\n\n"
                   + C.markdown_table(["run", "seconds", "vs FP32"], pass_table(args, device, parse_variants(args.pass_variants))))
    C.emit("\n".join(out), args.append)


if __name__ == "__main__":
    main()
