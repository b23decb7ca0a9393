"""SmoothQuant's untie option: a tied lm_head gets its own weight so final norm -> lm_head folds exactly;
the FP32 function is kept, the embedding is not touched, checkpoints rebuild the untie, ONNX carries both weights."""
import numpy as np
import pytest
import torch

import quantlab as ql
from quantlab.algorithms import AlgorithmContext, get_algorithm
from quantlab.algorithms import smoothquant as smoothquant_module
from quantlab.algorithms._params import check_params, parse_param_items

from tests.quantlab.algorithms.test_smoothquant import outputs, token_batches

VOCAB = 80  # no other weight of the tiny model has this shape (the export test finds lm_head's by it)

def tiny_llama(tie=True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                      tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # activation outliers in a few channels of the final norm's output, as real LMs have
        model.model.norm.weight[[3, 17]] *= 30.0
    return model


def smooth(model, batches, config=None, **params):
    def loop(m):
        for b in batches:
            m(**b)
    return get_algorithm("smoothquant").run(model, AlgorithmContext(forward_loop=loop, params=params,
                                                                     config=config or ql.int8_config()))


def loop_over(batches):
    def loop(m):
        for b in batches:
            m(**b)
    return loop


def test_untie_folds_norm_into_lm_head_keeps_the_function_and_the_embedding():
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    batches = token_batches()
    before = outputs(model, batches[0])
    details = smooth(model, batches, alpha=0.5, untie=True)
    after = outputs(model, batches[0])
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5 * float(before.abs().max())), float((after - before).abs().max())
    groups = {g["producer"]: g for g in details["groups"]}
    assert groups["model.norm"]["consumers"] == ["lm_head"]
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the fold stayed in the copy
    assert not torch.equal(model.lm_head.weight, embedding)  # ... which absorbed the factors
    untie = details["untie"]
    assert [(m["module"], m["shared_with"]) for m in untie["modules"]] == [("lm_head", ["model.embed_tokens"])]
    assert untie["extra_parameters"] == VOCAB * 32 and untie["extra_bytes"] == VOCAB * 32 * 4
    assert untie["config_tie_flag_cleared"] and model.config.tie_word_embeddings is False
    model.tie_weights()  # what Hugging Face code may call later: must not tie the copy back
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_without_untie_the_tied_group_is_skipped_with_the_hint():
    model = tiny_llama()
    details = smooth(model, token_batches(), alpha=0.5)
    skipped = {s["producer"]: s["reason"] for s in details["skipped"]}
    assert "shared (tied)" in skipped["model.norm"] and "smoothquant.untie=true" in skipped["model.norm"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert details["untie"] == {"modules": [], "extra_parameters": 0, "extra_bytes": 0}


def test_untie_is_undone_where_no_fold_happened(monkeypatch):
    model = tiny_llama()
    # The search finds no smoothing better than none for any group: the copy would be pure cost.
    monkeypatch.setattr(smoothquant_module, "search_alpha",
                        lambda consumers, channels, *a: (None, torch.ones(channels), {"none": 0.0}))
    details = smooth(model, token_batches(), untie=True)
    assert details["groups_smoothed"] == 0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert details["untie"]["modules"] == [] and model.config.tie_word_embeddings is True
    # An lm_head the config keeps in float is not untied either.
    model = tiny_llama()
    details = smooth(model, token_batches(), config=ql.int8_config(exclude=("lm_head",)), alpha=0.5, untie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight and details["untie"]["extra_parameters"] == 0


def test_untie_from_the_cli_text_and_bad_values():
    params = check_params("smoothquant", parse_param_items(["smoothquant.untie=true"]))
    assert params == {"smoothquant": {"untie": True}}
    with pytest.raises(ql.algorithms.AlgorithmError, match="untie must be true or false"):
        smooth(tiny_llama(), token_batches(), untie="yes please")


def _quantized(batches, untie=True):
    from quantlab.pipeline import run

    model = tiny_llama()
    config = ql.int8_config("max").replace(algorithms=("smoothquant",), algorithm_params={"smoothquant": {"untie": untie}})
    result = run(model, loop_over(batches), {"max": {}}, config=config)
    return model, result


def test_checkpoint_round_trip_redoes_the_untie(tmp_path):
    from quantlab.checkpoint import load_checkpoint, save_ptq_files

    batches = token_batches()
    model, result = _quantized(batches)
    assert result.transforms[0].details["untie"]["extra_parameters"] == VOCAB * 32
    save_ptq_files(result, model, tmp_path)
    rebuilt = load_checkpoint(tiny_llama(), tmp_path / "model.max.safetensors")
    assert rebuilt.lm_head.weight is not rebuilt.model.embed_tokens.weight
    torch.testing.assert_close(rebuilt.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(rebuilt.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(outputs(rebuilt, batches[1]), outputs(model, batches[1]), rtol=0, atol=0)
    # Without the rebuild both tensors would land in the one shared parameter: the check that it matters.
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_a_checkpoint_whose_untie_record_is_gone_is_refused(tmp_path):
    # Without the record the model's lm_head and embedding stay one parameter, and both of the
    # checkpoint's different tensors were loaded into it: the embedding silently became lm_head's weight.
    import json
    import struct

    from quantlab.checkpoint import CheckpointMismatchError, load_checkpoint, save_ptq_files

    model, result = _quantized(token_batches())
    save_ptq_files(result, model, tmp_path)
    path = tmp_path / "model.max.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    document = json.loads(header["__metadata__"]["quantlab"])
    document["transforms"][0]["details"].pop("untie")
    header["__metadata__"]["quantlab"] = json.dumps(document)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(CheckpointMismatchError, match="'lm_head.weight' and 'model.embed_tokens.weight' are one .*parameter"):
        load_checkpoint(tiny_llama(), path)


def test_onnx_export_carries_the_separate_lm_head_weight(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from quantlab.export.qdq import export_int8
    from quantlab.runtimes.onnxruntime.runner import OnnxRuntimeRunner

    batches = token_batches()
    model, _ = _quantized(batches)
    # With an attention mask (transformers' mask code without one uses aten::diff, which opset 17 lacks).
    inputs = {"input_ids": batches[0]["input_ids"], "attention_mask": torch.ones_like(batches[0]["input_ids"])}
    exported = export_int8(model, tmp_path / "untied.onnx", inputs)
    graph = onnx.load(str(exported.path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # The float embedding for the Gather, and lm_head's own INT8 weight (tied, the exporter would quantize
    # model.embed_tokens.weight for the MatMul instead): the smoothed copy, on the grid of its own scales.
    np.testing.assert_array_equal(init["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach().numpy())
    head, scale = init["lm_head.weight"], init["lm_head.weight_scale"]
    assert head.dtype == np.int8 and head.shape == (32, VOCAB)  # MatMul layout: [in, out]
    expected = np.clip(np.round(model.lm_head.weight.detach().numpy().T / scale), -127, 127)
    assert np.abs(head.astype(np.float64) - expected).max() <= 1
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear" and "lm_head.weight" in n.input]
    assert len(dequantize) == 1 and not any("embed_tokens" in i for n in dequantize for i in n.input)
    runner = OnnxRuntimeRunner(exported.path)
    ids = batches[1]["input_ids"]
    got = runner.run(dict(zip(runner.input_names, [ids.numpy(), torch.ones_like(ids).numpy()])))[0]
    want = outputs(model, batches[1]).numpy()
    assert np.abs(got - want).max() < 0.05 * max(1.0, np.abs(want).max())
