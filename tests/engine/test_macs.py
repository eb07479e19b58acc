"""MACs and weight sparsity: counted the same for float, int8 and low-bit models, and in every results.json."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import kdq
from kdq.engine import count_macs, weight_sparsity
from kdq.quant import quantize_dynamic, quantize_static
from kdq.quant.lowbit import LowBitConfig, quantize_lowbit


def resnet8_macs_by_hand(in_channels: int, size: int, num_classes: int) -> int:
    """resnet8 (stem, three one-block stages of 16, 32, 64 channels, 1x1 shortcuts where the
    shape changes, then fc): the sum over convolutions of out_h x out_w x out_c x in_c x k x k."""
    s1, s2, s3 = size, (size + 1) // 2, (size + 3) // 4  # stride-2 3x3 convs with padding 1
    convs = [  # (out_hw, out_c, in_c, k)
        (s1, 16, in_channels, 3),  # stem
        (s1, 16, 16, 3), (s1, 16, 16, 3),  # layer1: identity shortcut
        (s2, 32, 16, 3), (s2, 32, 32, 3), (s2, 32, 16, 1),  # layer2 and its 1x1 shortcut
        (s3, 64, 32, 3), (s3, 64, 64, 3), (s3, 64, 32, 1),  # layer3 and its 1x1 shortcut
    ]
    return sum(hw * hw * out_c * in_c * k * k for hw, out_c, in_c, k in convs) + 64 * num_classes


@pytest.mark.parametrize("in_channels, size", [(1, 8), (3, 32)])
def test_count_macs_matches_a_hand_computation(in_channels, size):
    model = kdq.create_model("resnet8", 10, in_channels)
    x = torch.randn(5, in_channels, size, size)
    assert count_macs(model, x) == resnet8_macs_by_hand(in_channels, size, 10)
    assert count_macs(kdq.create_model("mlp-small", 7, 20), torch.randn(3, 20)) == 20 * 64 + 64 * 7


def test_counting_changes_nothing():
    model = kdq.create_model("cnn-tiny", 10, 1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, torch.randn(4, 1, 8, 8))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name, shape", [("resnet8", (3, 32, 32)), ("mobilenetv2-x0.35", (3, 32, 32)),
                                         ("mlp-small", (64,))])
def test_int8_and_lowbit_models_count_their_float_macs(name, shape):
    """PyTorch's flop counter does not see inside int8 kernels: kdq counts them from their shapes."""
    torch.manual_seed(0)
    model = kdq.create_model(name, 10, shape[0]).eval()
    x = torch.randn(4, *shape)
    macs = count_macs(model, x)
    assert count_macs(quantize_static(model, x), x) == macs
    assert count_macs(quantize_dynamic(model), x) == macs
    lowbit = quantize_lowbit(kdq.create_model(name, 10, shape[0]), LowBitConfig.parse("w4a4"))
    assert count_macs(lowbit, x) == macs


def test_weight_sparsity():
    model = kdq.create_model("mlp-small", 10, 20)
    assert weight_sparsity(model) == 0.0
    with torch.no_grad():
        model.body[0][0].weight[:32] = 0  # 32 x 20 of 20 x 64 + 64 x 10 weights
    assert weight_sparsity(model) == pytest.approx(32 * 20 / (20 * 64 + 64 * 10))
    assert weight_sparsity(nn.ReLU()) == 0.0
    # int8: a zero weight is the zero point exactly, so pruned zeros survive quantization
    x = torch.randn(8, 20)
    assert weight_sparsity(quantize_static(model.eval(), x)) >= 32 * 20 / (20 * 64 + 64 * 10)


@pytest.mark.slow
def test_every_results_json_has_macs_and_sparsity(tmp_path):
    digits = kdq.load_dataset("digits", subset=300)
    run = kdq.train("resnet8", digits, out=tmp_path / "float", epochs=1, batch_size=64, progress=False)
    expected = resnet8_macs_by_hand(1, 8, 10)
    results = json.loads((tmp_path / "float" / "results.json").read_text())
    assert results["macs"] == run.results["macs"] == expected and results["sparsity"] == 0.0
    int8 = kdq.quantize(tmp_path / "float", tmp_path / "int8", calibration_batches=1, batch_size=32)
    assert int8["macs"] == expected and 0 <= int8["sparsity"] < 0.1
    assert kdq.evaluate(tmp_path / "int8", speed=False)["macs"] == expected
    lowbit = kdq.qat(tmp_path / "float", tmp_path / "w4", bits="w4a4", epochs=1, batch_size=64, progress=False)
    assert lowbit["macs"] == expected
    assert kdq.evaluate(tmp_path / "w4", speed=False)["macs"] == expected


def test_an_onnx_files_carried_figures_are_checked():
    from kdq.deploy.metadata import check_metadata
    from kdq.errors import KdqError

    meta = {"classes": ["a", "b"], "mean": [0.0], "std": [1.0], "input_shape": [1, 8, 8], "dataset": "digits",
            "precision": "float32"}
    check_metadata(meta, "m.onnx")  # an export made before kdq carried them
    check_metadata({**meta, "macs": 1234, "sparsity": 0.5}, "m.onnx")
    for bad, message in [({"macs": -1}, "macs must be an integer"), ({"macs": 1.5}, "macs must be an integer"),
                         ({"sparsity": 1.5}, r"sparsity must be a fraction in \[0, 1\]"),
                         ({"sparsity": "half"}, "sparsity must be a finite number")]:
        with pytest.raises(KdqError, match=message):
            check_metadata({**meta, **bad}, "m.onnx")
