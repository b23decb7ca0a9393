"""2:4 sparse INT8 (cuSPARSELt, plans made once) vs dense INT8 (torch._int_mm) vs dense FP16, on a GPU.

Sections, each printed as a table and saved to ``--out/sparse_gpu.json`` as it finishes:

1. **Correctness** per layer: a quantlab fake-quant ``nn.Linear`` (2:4-pruned, max-calibrated)
   against its runners: the sparse INT8 x INT8 -> INT32 accumulators must equal the exact
   integer product; the FP16 outputs of both runners must lie within the dequantization
   rounding bound of :mod:`quantlab.runtimes.cusparselt.verify` (ratio <= 1).
2. **Per layer shape** (T tokens x K in -> N out): FP16 ``F.linear``; dense INT8 (GEMM alone
   and with the quantize / dequantize kernels); sparse INT8 (the cuSPARSELt call with its
   fused scale+bias epilogue, alone and with the quantize kernel); sparse FP16; and
   ``torch._cslt_sparse_mm`` (searched alg id), which makes its plan on every call, eagerly.
3. **End to end**: BERT-base and MiniLM-L6 shapes (``transformers`` BertModel, random
   weights, batch 128 x 128 tokens) and a Llama-style MLP stack (LlamaMLP + RMSNorm blocks,
   hidden 8192, intermediate 28672, 4096 tokens): every encoder / MLP Linear on each path,
   the rest in FP16; the whole forward timed; outputs compared with the FP32 fake-quant model.
4. ``torch._cslt_sparse_mm`` eagerly vs replayed from a CUDA graph (last: a failed capture
   could disturb what follows).

Timing: CUDA graphs of several calls (inputs rotated over 4 buffers so small shapes do
not run from L2), CUDA events, median of repeats; eager timing where capture fails (the
table says which). ``--device cpu --tiny`` runs everything that does not need cuSPARSELt
on tiny shapes (a smoke test of the script itself).

    python benchmarks/bench_sparse_gpu.py --out /tmp/sparse
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _common import machine_header, markdown_table  # noqa: E402

RESULTS: Dict[str, Any] = {}
OUT: Optional[Path] = None


def save() -> None:
    if OUT is not None:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "sparse_gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def log(msg: str) -> None:
    print(msg, flush=True)


# -- timing (shared with quantlab compare's speed measurement) ------------------------------------------
from quantlab.runtimes.cusparselt.speed import Timing, cast_rest, time_call  # noqa: E402


# -- helpers ----------------------------------------------------------------------------------------------
def quantized_linear(k: int, n: int, tokens: int, device: torch.device, seed: int) -> Tuple[nn.Linear, torch.Tensor]:
    """A 2:4-pruned, max-calibrated quantlab fake-quant Linear (FP32) and an FP16 input for it."""
    import quantlab
    from quantlab import sparsity

    torch.manual_seed(seed)
    with torch.device(device):
        layer = nn.Linear(k, n)
        x = torch.randn(tokens, k)
    sparsity.prune(nn.Sequential(layer))
    quantlab.quantize(layer, quantlab.int8_config("max"), forward_loop=lambda m: m(x[: min(tokens, 1024)]))
    return layer, x.half()


def sparse_available() -> Tuple[bool, str]:
    from quantlab.runtimes.cusparselt import CuSparseLtUnavailableError, load_library

    try:
        lib = load_library()
    except CuSparseLtUnavailableError as exc:
        return False, str(exc)
    return True, f"cuSPARSELt {lib.version_string} (runtime {lib.version}, header {lib.header_version}); shim {lib.path.name}; library {lib.paths.library}"


# -- 1. correctness ---------------------------------------------------------------------------------------
def correctness(device: torch.device, shapes: Sequence[Tuple[int, int, int]], have_sparse: bool) -> None:
    from quantlab.runtimes.cusparselt import DenseInt8Linear, SparseInt8Linear, check_layer, int8_params, load_library

    lib = load_library() if have_sparse else None
    rows, out = [], []
    for i, (t, k, n) in enumerate(shapes):
        layer, _ = quantized_linear(k, n, t, device, seed=100 + i)
        params = int8_params(layer, f"L{i}")
        sparse = SparseInt8Linear(params, lib=lib) if have_sparse else None
        dense = DenseInt8Linear(params)
        torch.manual_seed(200 + i)
        x = (torch.randn(t, k, device=device) * 1.3).half()  # fresh data, partly beyond the calibrated range
        report = check_layer(layer, x, sparse=sparse, dense=dense, lib=lib, name=f"{t}x{k}->{n}")
        if sparse is not None:
            report["bias_mode"] = sparse.epilogue
            sparse.prepare(t)
            report["cusparselt_prune_check"] = sparse.prune_check
        out.append(report)
        rows.append([f"{t}x{k}->{n}", report.get("quantize_exact"), report.get("exact_int32", "-"),
                     report.get("cusparselt_prune_check", "-"), report.get("sparse_bound_ratio"),
                     report.get("sparse_epilogue_bound_ratio", "-"), report.get("dense_bound_ratio"),
                     report.get("sparse_vs_fakequant_rel"), report.get("dense_vs_fakequant_rel"),
                     report.get("fakequant_vs_exact_rel"), report.get("bias_mode", "-")])
    RESULTS["correctness"] = out
    save()
    log("### Correctness per layer (2:4-pruned Linear, max-calibrated; fresh FP16 input)\n")
    log(markdown_table(["layer", "INT8 input = fake-quant ints", "sparse INT32 acc exact", "cuSPARSELt prune check",
                        "sparse err/1-rounding bound", "sparse err/FP16-epilogue bound", "dense err/bound", "sparse vs fake-quant (rel max)", "dense vs fake-quant (rel max)",
                        "fake-quant vs exact (rel max)", "sparse bias"], rows))


def torch_cslt_op(weight_int8: torch.Tensor, alpha: torch.Tensor, qs: List[torch.Tensor]) -> Tuple[int, Callable[[int], Any]]:
    """PyTorch's 2:4 INT8 matmul (``torch._cslt_sparse_mm``, alg id searched once) as a call on input ``j``."""
    wc = torch._cslt_compress(weight_int8)
    alg = int(torch._cslt_sparse_mm_search(wc, qs[0].t()))

    def op(j: int) -> torch.Tensor:
        return torch._cslt_sparse_mm(wc, qs[j % len(qs)].t(), alpha=alpha, out_dtype=torch.float16, transpose_result=True, alg_id=alg)

    return alg, op


def torch_graph(device: torch.device, shapes: Sequence[Tuple[int, int, int]]) -> None:
    """``torch._cslt_sparse_mm`` eagerly and replayed from a CUDA graph (whose replay skips its per-call host work).

    Last in the script: a failed capture could leave the stream in a bad state.
    """
    from quantlab.runtimes.cusparselt import DenseInt8Linear, int8_params
    from quantlab.runtimes.cusparselt.kernels import quantize_int8

    rows, out = [], []
    for i, (t, k, n) in enumerate(shapes):
        entry: Dict[str, Any] = {"tokens": t, "in": k, "out": n}
        try:
            layer, _ = quantized_linear(k, n, t, device, seed=500 + i)
            params = int8_params(layer)
            dense = DenseInt8Linear(params)
            xs = [(torch.randn(t, k, device=device)).half() for _ in range(4)]
            qs = [quantize_int8(x, params.inv_input_scale) for x in xs]
            _, op = torch_cslt_op(dense.weight_int8, dense.alpha, qs)
            entry["eager"] = dataclasses.asdict(time_call(op, device=device, graph=False))
            entry["graph"] = dataclasses.asdict(time_call(op, device=device, graph=True))
        except Exception as exc:  # noqa: BLE001
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        out.append(entry)
        rows.append([f"{t}x{k}->{n}", (entry.get("eager") or {}).get("ms"), (entry.get("graph") or {}).get("ms"),
                     (entry.get("graph") or {}).get("how"), entry.get("error", "")])
    RESULTS["torch_cslt_graph"] = out
    save()
    log("### torch._cslt_sparse_mm: eager vs replayed from a CUDA graph (ms per call)\n")
    log(markdown_table(["T x K -> N", "eager", "graph replay", "timing", "error"], rows))


# -- 2. per layer shape -----------------------------------------------------------------------------------
def shape_bench(device: torch.device, shapes: Sequence[Tuple[int, int, int]], have_sparse: bool) -> None:
    from quantlab.runtimes.cusparselt import DenseInt8Linear, SparseInt8Linear, int8_params, load_library
    from quantlab.runtimes.cusparselt.kernels import quantize_int8
    from quantlab.runtimes.cusparselt.linear import KIND_FP16, SparsePlan, host_float

    lib = load_library() if have_sparse else None
    rows, out = [], []
    for i, (t, k, n) in enumerate(shapes):
        entry: Dict[str, Any] = {"tokens": t, "in": k, "out": n, "gflop": 2 * t * k * n / 1e9}
        try:
            layer, _ = quantized_linear(k, n, t, device, seed=300 + i)
            params = int8_params(layer, f"{t}x{k}->{n}")
            xs = [(torch.randn(t, k, device=device)).half() for _ in range(4)]
            w16 = layer.parametrizations.weight.original.detach().half()
            b16 = layer.bias.detach().half()
            entry["fp16"] = time_call(lambda j: F.linear(xs[j % 4], w16, b16), device=device)
            dense = DenseInt8Linear(params)
            qs = [quantize_int8(x, params.inv_input_scale) for x in xs]
            wt = dense.weight_int8.t()
            entry["int8_gemm"] = time_call(lambda j: torch._int_mm(qs[j % 4], wt), device=device)
            entry["int8_full"] = time_call(lambda j: dense(xs[j % 4]), device=device)
            if have_sparse:
                sparse = SparseInt8Linear(params, lib=lib)
                state = sparse.prepare(t)
                entry["alg_id"] = state.alg_id
                outs = [sparse._out(t, device) for _ in range(4)]
                alpha = sparse._alpha()
                entry["sparse_int8_gemm"] = time_call(
                    lambda j: state.plan.matmul(alpha, state.compressed, qs[j % 4], outs[j % 4], state.workspace), device=device)
                entry["sparse_int8_full"] = time_call(lambda j: sparse(xs[j % 4]), device=device)
                entry["epilogue"] = sparse.epilogue
                for variant in ("bias-separate", "int32"):  # the other epilogues, where right here
                    if variant == sparse.epilogue:
                        continue
                    try:
                        other = SparseInt8Linear(params, lib=lib, epilogue=variant)
                    except Exception as exc:  # noqa: BLE001 - not right on this library: say so
                        entry[f"sparse_int8_{variant}_error"] = str(exc)[:200]
                        continue
                    other.prepare(t)
                    entry[f"sparse_int8_{variant}_full"] = time_call(lambda j, other=other: other(xs[j % 4]), device=device)
                    del other
                # Sparse FP16 (same 2:4 weight in FP16), plan made and searched once too.
                w16_sparse = (layer.parametrizations.weight.original.detach()).half().contiguous()
                plan16 = SparsePlan(lib, n, t, k, KIND_FP16, alpha_vector=False, bias=None)
                c16 = plan16.compress(w16_sparse)
                box, one = host_float(1.0)
                outs16 = [torch.empty(t, n, dtype=torch.float16, device=device) for _ in range(4)]
                ws16 = plan16.search(one, c16, xs[0], outs16[0])
                entry["sparse_fp16_gemm"] = time_call(lambda j: plan16.matmul(one, c16, xs[j % 4], outs16[j % 4], ws16), device=device)
                # PyTorch's own op: a plan per call (the measurement), eagerly.
                try:
                    entry["torch_cslt_alg"], op = torch_cslt_op(dense.weight_int8, sparse.alpha, qs)
                    entry["torch_cslt_eager"] = time_call(op, device=device, graph=False)
                except Exception as exc:  # noqa: BLE001 - reported, not fatal
                    entry["torch_cslt_error"] = f"{type(exc).__name__}: {exc}"[:300]
                del sparse, plan16, box
        except Exception as exc:  # noqa: BLE001 - one shape failing must not lose the others
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            log(traceback.format_exc())
        out.append({k2: (dataclasses.asdict(v) if isinstance(v, Timing) else v) for k2, v in entry.items()})
        RESULTS["shapes"] = out
        save()
        fp16 = entry.get("fp16")

        def cell(key: str) -> Any:
            v = entry.get(key)
            return None if v is None else v.ms

        def speed(key: str) -> Any:
            v = entry.get(key)
            return None if v is None or fp16 is None else fp16.ms / v.ms

        rows.append([f"{t}x{k}->{n}", cell("fp16"), cell("int8_gemm"), cell("int8_full"), cell("sparse_int8_gemm"),
                     cell("sparse_int8_full"), cell("sparse_int8_bias-separate_full"), cell("sparse_int8_int32_full"), cell("sparse_fp16_gemm"), cell("torch_cslt_eager"),
                     speed("int8_full"), speed("sparse_int8_full"), speed("sparse_int8_gemm"),
                     None if fp16 is None else entry["gflop"] / fp16.ms, entry.get("error", "")])
    log("### Per layer shape (ms per call, median; speed-up = FP16 ms / path ms)\n")
    log(markdown_table(["T x K -> N", "FP16", "INT8 GEMM", "INT8 +q/dq", "2:4 INT8 GEMM", "2:4 INT8 +q", "2:4 INT8 +q, bias after", "2:4 INT8 (INT32 out) +q/dq",
                        "2:4 FP16 GEMM", "torch cslt (eager)", "x INT8", "x 2:4 INT8", "x 2:4 GEMM",
                        "FP16 TFLOP/s", "error"], rows))
    hows = sorted({v["how"] for e in out for v in e.values() if isinstance(v, dict) and "how" in v})
    log(f"timing modes seen: {', '.join(hows)}\n")


# -- 3. end to end ----------------------------------------------------------------------------------------
class MLPBlock(nn.Module):
    """Llama-style block: ``x + mlp(rmsnorm(x))`` with transformers' LlamaMLP and LlamaRMSNorm."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class MLPStack(nn.Module):
    def __init__(self, config: Any, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(config) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class BertEncoderOnly(nn.Module):
    """BertModel's last hidden state (a tensor, so the benchmark treats every model alike)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


def build_model(name: str, tiny: bool, device: torch.device) -> Tuple[nn.Module, Callable[[int], torch.Tensor], int]:
    """(FP32 model on ``device``, input maker by seed, tokens per forward)."""
    if name in ("bert-base", "minilm"):
        from transformers import BertConfig

        if tiny:
            config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)
            batch, seq = 4, 16
        elif name == "bert-base":
            config = BertConfig()
            batch, seq = 128, 128
        else:
            config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
            batch, seq = 128, 128
        config._attn_implementation = "sdpa"
        with torch.device(device):
            model = BertEncoderOnly(config).eval()

        def make(seed: int) -> torch.Tensor:
            g = torch.Generator(device="cpu").manual_seed(seed)
            return torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)

        return model, make, batch * seq
    from transformers import LlamaConfig

    hidden, inter, blocks, tokens = (64, 128, 2, 32) if tiny else (8192, 28672, 4, 4096)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu", mlp_bias=False)
    with torch.device(device):
        model = MLPStack(config, blocks).eval()

    def make_x(seed: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(tokens, hidden, generator=g).to(device)

    return model, make_x, tokens


def e2e(device: torch.device, names: Sequence[str], tiny: bool, have_sparse: bool) -> None:
    import quantlab
    from quantlab import sparsity
    from quantlab.runtimes.cusparselt import convert_linears, prepare_plans

    rows, out = [], []
    for name in names:
        entry: Dict[str, Any] = {"model": name}
        try:
            t0 = time.perf_counter()
            model, make, tokens = build_model(name, tiny, device)
            entry["tokens"] = tokens
            entry["linears"] = sum(isinstance(m, nn.Linear) for m in model.modules())
            prune = sparsity.prune(model)  # magnitude 2:4 on every Linear (random weights: speed only)
            entry["pruned"] = len(prune.layers)
            calib = make(1)
            calib_in = calib[: max(1, calib.shape[0] // 8)] if calib.dim() == 2 and calib.dtype == torch.long else calib[: max(16, tokens // 8)]
            fp16 = copy.deepcopy(model)
            sparsity.remove_masks(fp16)  # the FP16 baseline runs plain Linears (same pruned values)
            cast_rest(fp16, torch.float16)
            quantlab.quantize(model, quantlab.int8_config("max"), forward_loop=lambda m: m(calib_in))
            for ref in quantlab.iter_quantizers(model):  # statistics done: the CUDA collectors hold
                ref.quantizer.collector = None          # ctypes launch state that deepcopy refuses
            x = make(2)
            x16 = x if x.dtype == torch.long else x.half()
            entry["setup_s"] = time.perf_counter() - t0
            with torch.no_grad():
                tf32 = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = False
                reference = model(x).double()  # the FP32 fake-quant model
                with quantlab.quantization_disabled(model):
                    float_ref = model(x).double()
                torch.backends.cuda.matmul.allow_tf32 = tf32
                paths: Dict[str, nn.Module] = {"fp16": fp16}
                variants = [("int8", "int8", None)]
                if have_sparse:
                    variants.append(("sparse-int8", "sparse-int8", None))
                    if RESULTS.get("epilogue") != "int32":
                        variants.append(("sparse-int8-int32", "sparse-int8", "int32"))
                for mode, how, epilogue in variants:
                    t1 = time.perf_counter()
                    converted = copy.deepcopy(model)
                    report = convert_linears(converted, how, epilogue=epilogue, fallback=False)
                    cast_rest(converted, torch.float16)
                    prepare_plans(converted, tokens)
                    entry[f"{mode}_prepare_s"] = time.perf_counter() - t1
                    entry[f"{mode}_layers"] = {"converted": len(report.converted), "kept": report.kept}
                    paths[mode] = converted
                del model
                xs = [make(10 + j) for j in range(4)]
                xs = [v if v.dtype == torch.long else v.half() for v in xs]
                for mode, net in paths.items():
                    y = net(x16).double()
                    scale = float(reference.norm()) or 1.0
                    entry[f"{mode}_rel_l2_vs_fakequant"] = float((y - reference).norm()) / scale
                    entry[f"{mode}_rel_l2_vs_float"] = float((y - float_ref).norm()) / (float(float_ref.norm()) or 1.0)
                    entry[mode] = dataclasses.asdict(time_call(lambda j, net=net: net(xs[j % 4]), device=device, calls=2 if not tiny else 2, repeats=5))
                    save()
                entry["fakequant_rel_l2_vs_float"] = float((reference - float_ref).norm()) / (float(float_ref.norm()) or 1.0)
            del paths
        except Exception as exc:  # noqa: BLE001
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            log(traceback.format_exc())
        out.append(entry)
        RESULTS["e2e"] = out
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        f = entry.get("fp16", {}).get("ms") if isinstance(entry.get("fp16"), dict) else None

        def ms(key: str) -> Any:
            v = entry.get(key)
            return v["ms"] if isinstance(v, dict) else None

        def speed(key: str) -> Any:
            v = ms(key)
            return None if v is None or f is None else f / v

        rows.append([name, entry.get("tokens"), ms("fp16"), ms("int8"), ms("sparse-int8"), ms("sparse-int8-int32"),
                     speed("int8"), speed("sparse-int8"), speed("sparse-int8-int32"),
                     entry.get("int8_rel_l2_vs_fakequant"), entry.get("sparse-int8_rel_l2_vs_fakequant"),
                     entry.get("fp16_rel_l2_vs_float"), (entry.get("fp16") or {}).get("how") if isinstance(entry.get("fp16"), dict) else None,
                     entry.get("error", "")])
    log("### End to end (whole forward, ms, median; encoder / MLP Linears on the path, the rest FP16)\n")
    log(markdown_table(["model", "tokens", "FP16", "INT8", "2:4 INT8", "2:4 INT8 (INT32 out)", "x INT8", "x 2:4 INT8",
                        "x 2:4 INT8 (INT32 out)", "INT8 rel-L2 vs fake-quant",
                        "2:4 rel-L2 vs fake-quant", "FP16 rel-L2 vs FP32", "timing", "error"], rows))


SHAPES = [
    (16384, 384, 384), (16384, 384, 1536), (16384, 1536, 384),      # MiniLM-L6, batch 128 x 128
    (16384, 768, 768), (16384, 768, 3072), (16384, 3072, 768),      # BERT-base, batch 128 x 128
    (4096, 4096, 14336), (4096, 14336, 4096),                         # Llama-3-8B MLP, 4096 tokens
    (4096, 8192, 28672), (4096, 28672, 8192),                         # Llama-70B-style MLP, 4096 tokens
    (8192, 8192, 8192),
]
TINY_SHAPES = [(64, 32, 48), (48, 64, 32)]
CHECK_SHAPES = [(256, 768, 3072), (2048, 3072, 768), (4096, 8192, 8192)]


def main(argv: Optional[List[str]] = None) -> int:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for sparse_gpu.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the script, e.g. on the CPU)")
    parser.add_argument("--sections", default="correctness,shapes,e2e,torch-graph")
    parser.add_argument("--models", default="bert-base,minilm,llama-mlp")
    args = parser.parse_args(argv)
    OUT = Path(args.out) if args.out else None
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    have_sparse, how = sparse_available() if device.type == "cuda" else (False, "CPU run: no sparse runner")
    header = machine_header("2:4 sparse INT8 vs dense INT8 vs FP16 (benchmarks/bench_sparse_gpu.py)", {"sparse runner": how})
    log(header)
    RESULTS["header"] = header
    RESULTS["sparse_runner"] = how
    if have_sparse:
        from quantlab.runtimes.cusparselt.linear import epilogue_mode, epilogue_notes

        try:
            RESULTS["epilogue"] = epilogue_mode()
        except Exception as exc:  # noqa: BLE001 - no sparse path then; the dense ones still run
            RESULTS["epilogue"] = f"failed: {exc}"
            have_sparse = False
        RESULTS["epilogue_notes"] = epilogue_notes()
        log(f"sparse epilogue (self-test): {RESULTS['epilogue']}; rejected: {RESULTS['epilogue_notes']}")
    from quantlab.runtimes.cusparselt import kernels

    log(f"triton kernels: {kernels.HAVE_TRITON and device.type == 'cuda'}")
    save()
    sections = args.sections.split(",")
    start = time.perf_counter()
    if "correctness" in sections:
        correctness(device, TINY_SHAPES if args.tiny else CHECK_SHAPES, have_sparse)
        log(f"[{time.perf_counter() - start:.0f} s]")
    if "shapes" in sections:
        shape_bench(device, TINY_SHAPES if args.tiny else SHAPES, have_sparse)
        log(f"[{time.perf_counter() - start:.0f} s]")
    if "e2e" in sections:
        e2e(device, [m for m in args.models.split(",") if m], args.tiny, have_sparse)
        log(f"[{time.perf_counter() - start:.0f} s]")
    if "torch-graph" in sections and have_sparse:
        torch_graph(device, TINY_SHAPES if args.tiny else [(16384, 768, 768), (4096, 8192, 28672)])
        log(f"[{time.perf_counter() - start:.0f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
