"""2:4 masks along the input dimension, layer selection, and the errors bad input gets."""
import pytest
import torch
from torch import nn

from quantlab.sparsity import SparsityError, is_2to4, mask_2to4, prune, select_layers
from quantlab.sparsity.pattern import group_violations, input_axis


def _groups_along(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """Non-zero counts of every group of 4 consecutive entries along ``axis`` (a plain reference)."""
    moved = weight.movedim(axis, -1)
    return (moved.reshape(*moved.shape[:-1], -1, 4) != 0).sum(-1)


def test_linear_mask_keeps_the_two_largest_of_every_four_inputs():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.2, 0.3]])
    mask = mask_2to4(w, axis=1)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]


def test_conv_mask_groups_run_along_input_channels_for_every_output_channel_and_tap():
    torch.manual_seed(1)
    w = torch.randn(6, 8, 3, 4)
    masked = w * mask_2to4(w, axis=1)
    # TensorRT's rule: weights[k, 4c:4c+4, r, s] holds at most two non-zeros.
    for k in range(6):
        for r in range(3):
            for s in range(4):
                for c in range(2):
                    assert int((masked[k, 4 * c:4 * c + 4, r, s] != 0).sum()) == 2
    assert is_2to4(masked, axis=1)
    assert not is_2to4(masked, axis=3)  # the pattern is along the input channels, not the kernel width


def test_prune_puts_the_pattern_on_each_layer_along_its_input_axis():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 6))
    report = prune(model)
    assert [layer.name for layer in report.layers] == ["0", "3"]
    conv, fc = model[0].weight, model[3].weight
    assert bool((_groups_along(conv, 1) == 2).all()) and bool((_groups_along(fc, 1) == 2).all())
    assert all(layer.kept == pytest.approx(0.5) for layer in report.layers)


def test_gpt2_conv1d_weights_are_pruned_along_axis_0():
    transformers = pytest.importorskip("transformers")
    layer = transformers.pytorch_utils.Conv1D(6, 8)  # weight [in=8, out=6]
    assert input_axis(layer) == 0
    prune(nn.Sequential(layer))
    assert bool((_groups_along(layer.weight, 0) == 2).all())


def test_checker_counts_groups_that_break_the_pattern():
    w = torch.ones(2, 8)
    w[0, :4] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert group_violations(w, 1) == (3, 4)
    assert not is_2to4(w, 1)
    assert not is_2to4(torch.zeros(3, 6), 1)  # 6 is not a multiple of 4


def test_a_named_layer_whose_input_dim_is_not_a_multiple_of_4_is_an_error_naming_it():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    with pytest.raises(SparsityError, match=r"layer '0' \(weight \(8, 6\)\): input dimension 6 is not a multiple of 4"):
        prune(model, include=["0", "1"])
    assert not any("parametrizations" in n for n, _ in model.named_modules())  # nothing pruned


def test_a_wildcard_skips_ineligible_layers_and_reports_them_unless_strict():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    selection = select_layers(model)
    assert [t.name for t in selection.targets] == ["2"]
    assert dict(selection.skipped) == {"0": "input dimension 1 is not a multiple of 4",
                                       "1": "input dimension 1 (1 per group of a 8-group conv) is not a multiple of 4"}
    with pytest.raises(SparsityError, match="layer '0'.*layer '1'"):
        select_layers(model, strict=True)


def test_a_pattern_matching_no_layer_is_an_error_naming_it():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(SparsityError, match=r"pattern 'encoder\.\*' matches no prunable layer of Sequential \(Linear and Conv layers: 0\)"):
        prune(model, include=["encoder.*"])
    with pytest.raises(SparsityError, match="pattern 'head' matches no prunable layer"):
        prune(model, exclude=["head"])


def test_conv_transpose_is_not_prunable():
    model = nn.Sequential(nn.ConvTranspose2d(8, 8, 2))
    with pytest.raises(SparsityError, match="ConvTranspose2d has no sparse kernels"):
        prune(model, include=["0"])


def test_unknown_method_and_sparsegpt_without_data_are_errors():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(SparsityError, match="unknown pruning method 'random'"):
        prune(model, "random")
    with pytest.raises(SparsityError, match="sparsegpt needs calibration data"):
        prune(model, "sparsegpt")
