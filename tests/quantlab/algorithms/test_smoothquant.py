"""SmoothQuant: folds are exact (same FP32 function), only where exact, export stays valid, bad input is clear."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantlab as ql
from quantlab.algorithms import AlgorithmContext, AlgorithmError, get_algorithm, parse_algorithms, run_stage, Stage


def smooth(model, batches, **params):
    """Runs smoothquant on ``model`` with dict or tensor batches; returns its details."""
    def loop(m):
        for b in batches:
            m(**b) if isinstance(b, dict) else m(b)
    return get_algorithm("smoothquant").run(model, AlgorithmContext(forward_loop=loop, params=params, config=ql.int8_config()))


def outputs(model, batch):
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") else out).clone()


def assert_same_function(before, after):
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5 * float(before.abs().max())), float((after - before).abs().max())


def groups_by_producer(details):
    return {g["producer"]: g for g in details["groups"]}


# -- models ---------------------------------------------------------------------------------------------------
class SimpleRMSNorm(nn.Module):
    """Llama's RMSNorm written out (nn.RMSNorm's aten::rms_norm has no ONNX opset-17 export)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Block(nn.Module):
    """A Llama-style block in plain torch: RMSNorm -> q/k/v (grouped KV heads) -> SDPA -> o; RMSNorm -> SwiGLU."""

    def __init__(self, dim=32, heads=4, kv_heads=2, hidden=64):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attn_norm = SimpleRMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = SimpleRMSNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.o(a)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids):
        return self.head(self.norm(self.blocks(self.embed(input_ids))))


def with_outlier_channels(model, norm_names, channels=(3, 17), gain=40.0):
    """Plants activation outliers in fixed channels (as LLMs have) by scaling the norms' weights there."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in norm_names:
            modules[name].weight[list(channels)] *= gain
    return model


def tiny_llama(tie=False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(n=3, vocab=64):
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (2, 12), generator=generator)} for _ in range(n)]


# -- exact folds ----------------------------------------------------------------------------------------------
def test_tiny_hf_llama_folds_every_exact_group_and_keeps_the_function():
    model = tiny_llama()
    batches = token_batches()
    before = outputs(model, batches[0])
    details = smooth(model, batches)
    assert_same_function(before, outputs(model, batches[0]))
    groups = groups_by_producer(details)
    for i in range(2):
        layer = f"model.layers.{i}"
        assert groups[f"{layer}.input_layernorm"]["consumers"] == [f"{layer}.self_attn.{p}_proj" for p in "qkv"]
        assert groups[f"{layer}.post_attention_layernorm"]["consumers"] == [f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"]
        # Through attention (grouped KV heads: each v channel feeds two o columns) and through act(gate) * up.
        assert groups[f"{layer}.self_attn.v_proj"]["consumers"] == [f"{layer}.self_attn.o_proj"]
        assert groups[f"{layer}.mlp.up_proj"]["consumers"] == [f"{layer}.mlp.down_proj"]
        for blocked in ("q_proj", "k_proj", "o_proj"):  # rotary / residual: no exact fold
            assert f"{layer}.self_attn.{blocked}" not in groups
        assert f"{layer}.mlp.gate_proj" not in groups and f"{layer}.mlp.down_proj" not in groups
    assert details["fp32_relative_change"] < 1e-5


def test_tied_lm_head_is_not_folded():
    model = tiny_llama(tie=True)
    batches = token_batches()
    before = outputs(model, batches[0])
    details = smooth(model, batches, alpha=0.5)
    assert_same_function(before, outputs(model, batches[0]))
    skipped = {s["producer"]: s["reason"] for s in details["skipped"]}
    assert "shared (tied)" in skipped["model.norm"]
    assert "model.norm" not in groups_by_producer(details)


def test_tiny_bert_folds_value_into_attention_output_only():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=2, num_attention_heads=4)).eval()
    batches = [dict(b, attention_mask=torch.ones(2, 12, dtype=torch.int64)) for b in token_batches()]
    batches[0]["attention_mask"][:, 9:] = 0
    before = outputs(model, batches[0])
    details = smooth(model, batches)
    assert_same_function(before, outputs(model, batches[0]))
    assert sorted(groups_by_producer(details)) == [f"encoder.layer.{i}.attention.self.value" for i in range(2)]
    skipped = {s["producer"]: s["reason"] for s in details["skipped"]}
    # Post-norm BERT: every LayerNorm output is also the residual, so no norm fold is exact.
    assert "add" in skipped["encoder.layer.0.attention.output.LayerNorm"]
    assert "model output" in skipped["encoder.layer.1.output.LayerNorm"]


def test_plain_sequential_layernorm_linear_relu_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    with_outlier_channels(model, ["0"], channels=(2, 9))
    batches = [torch.randn(32, 16) for _ in range(3)]
    before = outputs(model, batches[0])
    details = smooth(model, batches)
    assert_same_function(before, outputs(model, batches[0]))
    groups = groups_by_producer(details)
    assert groups["0"]["consumers"] == ["1"] and groups["1"]["consumers"] == ["3"]  # ReLU: positive factors pass


def test_fixed_alpha_half_balances_activation_and_weight_maxima():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8)).eval()
    with_outlier_channels(model, ["0"], channels=(2, 9))
    batches = [torch.randn(64, 16) for _ in range(2)]
    with torch.no_grad():
        x_max = torch.stack([model[0](b).abs().amax(0) for b in batches]).amax(0)
    w_max = model[1].weight.detach().abs().amax(0)
    details = smooth(model, batches, alpha=0.5)
    with torch.no_grad():
        x_max_after = torch.stack([model[0](b).abs().amax(0) for b in batches]).amax(0)
    w_max_after = model[1].weight.detach().abs().amax(0)
    expected = torch.sqrt(x_max * w_max)  # alpha 0.5: both maxima meet at the geometric mean
    torch.testing.assert_close(x_max_after, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_max_after, expected, rtol=1e-4, atol=1e-6)
    group = groups_by_producer(details)["0"]
    assert group["alpha"] == 0.5
    # The per-tensor activation range (what one INT8 scale must cover) shrinks: the outliers moved into W.
    assert x_max_after.max() < 0.5 * x_max.max()
    assert group["act_max_smoothed"] == pytest.approx(float(x_max_after.max()), rel=1e-4)


def test_smoothing_reduces_int8_error_on_outlier_channels():
    torch.manual_seed(0)
    model = with_outlier_channels(TinyLM().eval(), ["blocks.0.attn_norm", "blocks.0.mlp_norm", "blocks.1.attn_norm"])
    data = [torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    reference = outputs(model, data[0])
    errors = {}
    for algorithms in ((), ("smoothquant",)):
        copy = TinyLM().eval()
        copy.load_state_dict(model.state_dict())
        ql.quantize(copy, ql.int8_config("max").replace(algorithms=algorithms), forward_loop=lambda m: [m(x) for x in data])
        errors[algorithms] = float(((outputs(copy, data[0]) - reference) ** 2).mean())
    assert errors[("smoothquant",)] < 0.5 * errors[()], errors


def test_custom_block_groups_and_export_pass_the_checker_and_match_onnx_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    from quantlab.export.check import check_model
    from quantlab.export.qdq import export_int8
    from quantlab.runtimes.onnxruntime.runner import OnnxRuntimeRunner

    torch.manual_seed(0)
    model = with_outlier_channels(TinyLM().eval(), ["blocks.0.attn_norm", "blocks.1.mlp_norm"])
    data = [torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fp32 = outputs(model, data[0])
    config = ql.int8_config("max").replace(algorithms=("smoothquant",))
    from quantlab.pipeline import run

    result = run(model, lambda m: [m(x) for x in data], {"max": {}}, config=config)
    (report,) = result.transforms
    groups = groups_by_producer(report.details)
    assert set(groups) == {"blocks.0.attn_norm", "blocks.0.v", "blocks.0.mlp_norm", "blocks.0.up",
                           "blocks.1.attn_norm", "blocks.1.v", "blocks.1.mlp_norm", "blocks.1.up", "norm"}
    with ql.quantization_disabled(model):
        assert_same_function(fp32, outputs(model, data[0]))  # transformed weights, FP32 function
    exported = export_int8(model, tmp_path / "smooth.onnx", data[0][:2])
    check = check_model(exported.path)
    assert check.ok, [f.message for f in check.errors]
    import onnx

    ops = {n.op_type for n in onnx.load(str(exported.path)).graph.node}
    assert "Mul" in ops  # the model's own silu(gate) * up ...
    mul_count = sum(n.op_type == "Mul" for n in onnx.load(str(exported.path)).graph.node)
    runner = OnnxRuntimeRunner(exported.path)
    got = runner.run({runner.input_names[0]: data[1].numpy()})[0]
    expected = outputs(model, data[1]).numpy()
    # Same INT8 grid; only rounding flips of values at a midpoint (one step each) may differ.
    assert np.abs(got - expected).max() < 0.05 * max(1.0, np.abs(expected).max())
    # ... and no op was added by smoothing: the same model exported without it has as many Muls.
    plain = TinyLM().eval()
    ql.quantize(plain, ql.int8_config("max"), forward_loop=lambda m: [m(x) for x in data])
    plain_export = export_int8(plain, tmp_path / "plain.onnx", data[0][:2])
    assert sum(n.op_type == "Mul" for n in onnx.load(str(plain_export.path)).graph.node) == mul_count


# -- bad input ------------------------------------------------------------------------------------------------
def test_a_model_with_nothing_foldable_gets_a_clear_error():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    with pytest.raises(AlgorithmError, match=r"nothing in Sequential can be smoothed with an exact fold.*0: output used by gelu"):
        smooth(model, [torch.randn(4, 8)])
    with pytest.raises(AlgorithmError, match="has no nn.Linear"):
        smooth(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), [torch.randn(1, 3, 8, 8)])


def test_no_data_empty_data_and_bad_parameters_get_clear_errors():
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    with pytest.raises(AlgorithmError, match="needs calibration data"):
        run_stage(model, parse_algorithms("smoothquant"), Stage.TRANSFORM)
    with pytest.raises(AlgorithmError, match="needs calibration data"):
        get_algorithm("smoothquant").run(model, AlgorithmContext(forward_loop=None))
    with pytest.raises(AlgorithmError, match="calibration data is empty"):
        smooth(model, [])
    for params, message in (({"alpha": 1.5}, "alpha must be in"), ({"grid": []}, "grid"), ({"samples": 2}, "samples"),
                            ({"alhpa": 0.5}, "unknown parameter")):
        with pytest.raises(AlgorithmError, match=message):
            smooth(model, [torch.randn(4, 8)], **params)


@pytest.mark.parametrize("item, message", [
    ("smoothquant.alpha=true", "alpha must be a number in"),  # was taken as alpha 1.0 (float(True))
    ("smoothquant.grid=[0.5, true]", "grid must be a list of numbers"),  # was taken as [0.5, 1.0]
])
def test_booleans_are_not_numbers(item, message):
    from quantlab.algorithms import check_params, parse_param_items

    with pytest.raises(AlgorithmError, match=message):
        check_params("smoothquant", parse_param_items([item]))
