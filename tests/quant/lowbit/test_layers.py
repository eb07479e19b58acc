"""Low-bit layers, LowBitConfig and quantize_lowbit on zoo models: structure, training, reloading."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdq.engine import TrainConfig, fit
from kdq.errors import KdqError
from kdq.models import create_model
from kdq.quant.lowbit import (
    LowBitConfig,
    QuantConv2d,
    QuantLinear,
    lowbit_layers,
    make_quantizer,
    quantize_lowbit,
    rebuild_lowbit,
)

# Schemes covering every quantizer in every role it supports.
SCHEMES = {
    "lsq-w4a4": LowBitConfig(4, 4),
    "lsq-w2a2-per-tensor": LowBitConfig(2, 2, per_channel=False),
    "dorefa-w2a2": LowBitConfig(2, 2, "dorefa", "dorefa"),
    "dorefa-w1-pact-a2": LowBitConfig(1, 2, "dorefa", "pact"),
    "binary-w1-lsq-a2": LowBitConfig(1, 2, "binary", "lsq"),
    "ternary-w2-uniform-a4": LowBitConfig(2, 4, "ternary", "uniform"),
    "uniform-w3a3": LowBitConfig(3, 3, "uniform", "uniform"),
    "lsq-w16a16-all-layers": LowBitConfig(16, 16, first_last_bits=None),
}


def _one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


# ---- the layers


def test_layers_without_quantizers_match_the_float_layers():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    linear = nn.Linear(5, 3)
    x, v = torch.randn(2, 4, 9, 9), torch.randn(4, 5)
    assert torch.equal(QuantConv2d(conv)(x), conv(x))
    assert torch.equal(QuantLinear(linear)(v), linear(v))
    no_bias = nn.Conv2d(3, 3, 1, bias=False)
    assert QuantConv2d(no_bias).bias is None


def test_layers_quantize_weight_and_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
    wq, aq = make_quantizer("uniform", 3, "weight"), make_quantizer("dorefa", 2, "activation")
    layer = QuantConv2d(conv, wq, aq)
    x = torch.rand(2, 3, 5, 5)
    expected = F.conv2d(aq(x), wq(conv.weight), conv.bias, padding=1)
    assert torch.equal(layer(x), expected)
    assert layer.weight is not conv.weight  # a copy: the float layer is left alone


def test_layers_reject_mismatched_quantizers():
    with pytest.raises(KdqError) as err:
        QuantLinear(nn.Linear(2, 2), make_quantizer("lsq", 4, "activation"))
    assert "role='weight'" in _one_line(err)
    with pytest.raises(KdqError):
        QuantConv2d(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))


def test_freeze_weight_keeps_outputs_and_stops_training():
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(6, 3), make_quantizer("lsq", 3, "weight", per_channel=True, channels=3))
    x = torch.randn(4, 6)
    before = layer(x)
    layer.freeze_weight()
    assert torch.equal(layer(x), before) and not layer.weight.requires_grad
    assert torch.equal(layer.export_weight().codes, layer.weight_quantizer.export(layer.weight).codes)
    layer.unfreeze_weight()
    assert layer.weight.requires_grad and torch.equal(layer(x), before)  # quantizing quantized weights


# ---- the config


def test_parse_schemes():
    assert LowBitConfig.parse("w4a4") == LowBitConfig(4, 4)
    assert LowBitConfig.parse("W2A32").act_bits is None
    assert LowBitConfig.parse("w2").act_bits is None
    config = LowBitConfig.parse("w1a2", quantizer="dorefa", act_quantizer="pact", first_last_bits=None)
    assert (config.weight_bits, config.act_bits, config.weight_quantizer, config.act_quantizer) == (1, 2, "dorefa", "pact")
    assert LowBitConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "build, hint",
    [
        (lambda: LowBitConfig.parse("w4x4"), "w<bits>a<bits>"),
        (lambda: LowBitConfig.parse("w0a4"), "weight_bits must be an integer from 1 to 16"),
        (lambda: LowBitConfig.parse("w33a4"), "weight_bits must be an integer from 1 to 16"),
        (lambda: LowBitConfig.parse("w4a0"), "act_bits must be"),
        (lambda: LowBitConfig(4, 32), "None for float activations"),
        (lambda: LowBitConfig(4, 4, first_last_bits=0), "first_last_bits"),
        (lambda: LowBitConfig.parse("w4a4", quantizer="lsx"), "did you mean lsq"),
        (lambda: LowBitConfig.parse("w4a4", quantizer="pact"), "for weights use one of"),
        (lambda: LowBitConfig.parse("w2a2", quantizer="binary"), "uses 1 bit"),
        (lambda: LowBitConfig(1, 2, "binary", "binary"), "for activations use one of"),
        (lambda: LowBitConfig.parse("w4a4", per_chanel=True), "did you mean per_channel"),
        (lambda: LowBitConfig(4, 4, per_channel=1), "per_channel must be true or false"),
    ],
)
def test_bad_configs_fail_with_one_line(build, hint):
    with pytest.raises(KdqError) as err:
        build()
    assert hint in _one_line(err)


# ---- quantize_lowbit on zoo models


def test_quantize_lowbit_replaces_every_layer_and_records_it():
    model = create_model("cnn-tiny", 10, 1)
    q = quantize_lowbit(model, "w4a4")
    layers = lowbit_layers(q)
    assert len(layers) == 7 and not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in q.modules())
    assert isinstance(model.stage1[0][0], nn.Conv2d)  # the original is left alone
    first, last = layers["stage1.0.0"], layers["fc"]
    assert (first.weight_quantizer.bits, first.act_quantizer.bits, last.weight_quantizer.bits) == (8, 8, 8)
    middle = layers["stage2.1.0"]
    assert (middle.weight_quantizer.bits, middle.act_quantizer.bits) == (4, 4)
    assert middle.weight_quantizer.step.shape == (16,)  # per-channel lsq, sized from the layer
    assert q.kdq_spec == model.kdq_spec
    assert json.loads(json.dumps(q.kdq_lowbit)) == q.kdq_lowbit
    assert q.kdq_lowbit["layers"]["fc"]["weight"] == {"name": "lsq", "bits": 8, "options": {"per_channel": True}}
    assert q(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_edge_layers_fall_back_to_uniform_and_can_be_turned_off():
    model = create_model("resnet8", 4, 1)
    layers = lowbit_layers(quantize_lowbit(model, LowBitConfig(2, 2, "dorefa", "pact")))
    stem, fc, inner = layers["stem.0"], layers["fc"], layers["layer1.0.conv1.0"]
    assert type(stem.weight_quantizer).__name__ == "UniformQuantizer" and stem.act_quantizer.bits == 8
    assert type(fc.act_quantizer).__name__ == "UniformQuantizer"
    assert type(inner.weight_quantizer).__name__ == "DoReFaQuantizer" and type(inner.act_quantizer).__name__ == "PACTQuantizer"
    flat = lowbit_layers(quantize_lowbit(model, LowBitConfig(2, None, first_last_bits=None)))
    assert all(m.weight_quantizer.bits == 2 and m.act_quantizer is None for m in flat.values())


def test_filter_fn_chooses_layers():
    model = create_model("cnn-tiny", 10, 1)
    q = quantize_lowbit(model, "w4a4", filter_fn=lambda name, m: isinstance(m, nn.Conv2d) and name.startswith("stage2"))
    assert sorted(lowbit_layers(q)) == ["stage2.0.0", "stage2.1.0"]
    assert isinstance(q.fc, nn.Linear)
    with pytest.raises(KdqError) as err:
        quantize_lowbit(model, "w4a4", filter_fn=lambda name, m: name == "nope")
    assert "filter_fn accepted none" in _one_line(err)
    with pytest.raises(KdqError) as err:
        quantize_lowbit(nn.Sequential(nn.ReLU()), "w4a4")
    assert "no nn.Conv2d or nn.Linear" in _one_line(err)


def test_rebuild_from_record_and_bad_records():
    model = create_model("cnn-tiny", 10, 1)
    q = quantize_lowbit(model, LowBitConfig(3, 3, "uniform", "pact"))
    again = rebuild_lowbit(model, json.loads(json.dumps(q.kdq_lowbit)))
    assert [type(m) for m in again.modules()] == [type(m) for m in q.modules()]
    bad = json.loads(json.dumps(q.kdq_lowbit))
    bad["layers"]["fc"]["weight"]["name"] = "ptac"
    with pytest.raises(KdqError, match="unknown quantizer 'ptac'"):
        rebuild_lowbit(model, bad)
    with pytest.raises(KdqError, match="not a Conv2d/Linear"):
        rebuild_lowbit(model, {**q.kdq_lowbit, "layers": {"pool": q.kdq_lowbit["layers"]["fc"]}})
    with pytest.raises(KdqError, match="malformed"):
        rebuild_lowbit(model, {"layers": 3})


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_trains_on_a_zoo_model(scheme):
    torch.manual_seed(0)
    q = quantize_lowbit(create_model("resnet8", 4, 1), SCHEMES[scheme])
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    F.cross_entropy(q(x), y).backward()
    grads = [p.grad for p in q.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_w4a4_lsq_training_reduces_the_loss(toy_data):
    torch.manual_seed(0)
    q = quantize_lowbit(create_model("cnn-tiny", 4, 1), LowBitConfig.parse("w4a4"))
    x, y = toy_data.train.x[:64], toy_data.train.y[:64]
    opt = torch.optim.Adam(q.parameters(), lr=0.01)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_fit_trains_a_lowbit_model_and_state_dict_round_trips(toy_data):
    q = quantize_lowbit(create_model("cnn-tiny", 4, 1), "w4a4")
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, augment=False, progress=False, warmup_epochs=0.0)
    result = fit(q, toy_data, cfg)
    assert result.best_val_accuracy > 0.5  # 4 classes: chance is 0.25
    fresh = quantize_lowbit(create_model("cnn-tiny", 4, 1), "w4a4")
    fresh.load_state_dict(q.state_dict())
    q.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(toy_data.val.x), q(toy_data.val.x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_cuda_with_autocast():
    q = quantize_lowbit(create_model("resnet8", 4, 1), "w2a2").cuda()
    x, y = torch.randn(8, 1, 8, 8, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(q(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in q.parameters())
