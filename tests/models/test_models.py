"""The model zoo: every registered model is checked for the contracts later stages rely on."""

from __future__ import annotations

import json
import operator

import pytest
import torch
from torch import fx, nn
from torch.ao.quantization.quantize_fx import fuse_fx

from kdq.errors import KdqError
from kdq.models import create_model, list_models, model_info
from kdq.models.mobilenetv2 import make_divisible
from kdq.models.resnet import BasicBlock, ResNet
from kdq.models.wide_resnet import WideResNet

ALL = list_models()
IMAGE = [n for n in ALL if model_info(n).input_kind == "image"]
VECTOR = [n for n in ALL if model_info(n).input_kind == "vector"]
SIZES = (8, 28, 32)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def example_input(name: str, in_channels: int, size: int = 8, batch: int = 2) -> torch.Tensor:
    if model_info(name).input_kind == "image":
        return torch.randn(batch, in_channels, size, size)
    return torch.randn(batch, in_channels)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_zoo_has_the_promised_models() -> None:
    promised = {
        *(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)),
        *("wrn-16-1", "wrn-16-2", "wrn-16-4", "wrn-28-10", "wrn-40-2"),
        *("mobilenetv2", "mobilenetv2-x0.5", "mobilenetv2-x0.35"),
        *("cnn-tiny", "cnn-small", "cnn-medium", "mlp", "mlp-small"),
    }
    assert promised <= set(ALL)
    assert all(model_info(n).description for n in ALL)


# ---- shapes, gradients, rebuilding


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", IMAGE)
def test_image_forward_shapes(name: str, in_channels: int, num_classes: int) -> None:
    model = create_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    with torch.no_grad():
        for size in SIZES:
            assert model(torch.randn(2, in_channels, size, size)).shape == (2, num_classes)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", VECTOR)
def test_vector_forward_shapes(name: str, num_classes: int) -> None:
    for features in (1, 3, 20):
        model = create_model(name, num_classes=num_classes, in_channels=features).eval()
        assert model(torch.randn(2, features)).shape == (2, num_classes)
    # The MLP flattens, so an image batch works when in_channels = C*H*W.
    model = create_model(name, num_classes=num_classes, in_channels=1 * 28 * 28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, num_classes)


@pytest.mark.parametrize("name", ALL)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = create_model(name, in_channels=1).train()
    model(example_input(name, 1)).logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", ALL)
def test_spec_rebuilds_the_same_architecture(name: str) -> None:
    model = create_model(name, num_classes=7, in_channels=1).eval()
    spec = json.loads(json.dumps(model.kdq_spec))  # what a run directory gives back
    assert spec == {"name": name, "num_classes": 7, "in_channels": 1, "kwargs": {}}
    rebuilt = create_model(**spec).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = example_input(name, 1)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet8", {"width": 0.5, "zero_init_residual": True}),
        ("wrn-16-1", {"dropout": 0.3}),
        ("mobilenetv2-x0.35", {"width_mult": 0.25, "dropout": 0.2}),
        ("cnn-small", {"width": 4}),
        ("mlp", {"hidden": (32, 16), "dropout": 0.1}),
    ],
)
def test_spec_carries_options(name: str, kwargs: dict) -> None:
    model = create_model(name, in_channels=3, **kwargs)
    spec = json.loads(json.dumps(model.kdq_spec))
    rebuilt = create_model(**spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert spec["kwargs"] == json.loads(json.dumps(kwargs))
    assert rebuilt.kdq_spec == spec and n_params(rebuilt) == n_params(model)


# ---- conventions that quantization, pruning and feature distillation build on


@pytest.mark.parametrize("name", IMAGE)
def test_fx_trace_matches_eager_and_uses_module_activations(name: str) -> None:
    model = create_model(name).eval()
    traced = fx.symbolic_trace(model)
    functions = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    # Only adds and flatten: activations are modules, so they can be fused and observed.
    assert functions <= {operator.add, torch.flatten}
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", IMAGE)
def test_conv_bn_relu_fuse(name: str) -> None:
    model = create_model(name).eval()
    fused = fuse_fx(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    if not name.startswith("wrn"):  # pre-activation BNs follow an add, not a conv
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


@pytest.mark.parametrize("name", ALL)
def test_feature_layers_and_classifier(name: str) -> None:
    model = create_model(name, num_classes=5).eval()
    modules = dict(model.named_modules())
    layers = model.feature_layers()
    assert layers and all(layer in modules for layer in layers)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 5
    outputs = {}
    for layer in layers:
        modules[layer].register_forward_hook(lambda m, i, o, layer=layer: outputs.__setitem__(layer, o))
    with torch.no_grad():
        model(example_input(name, 3, size=8))
    assert set(outputs) == set(layers)
    if model_info(name).input_kind == "image":
        sides = [outputs[layer].shape[-1] for layer in layers]
        assert sides == sorted(sides, reverse=True) and sides[-1] >= 1


# ---- sizes


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet20", 0.27e6),
        ("resnet56", 0.85e6),
        ("resnet110", 1.7e6),
        ("wrn-16-4", 2.7e6),
        ("wrn-40-2", 2.2e6),
        ("mobilenetv2", 2.25e6),
    ],
)
def test_param_counts_match_the_papers(name: str, expected: float) -> None:
    assert abs(n_params(create_model(name)) - expected) <= 0.1 * expected


def test_cnn_small_is_a_small_student() -> None:
    assert 20_000 <= n_params(create_model("cnn-small", in_channels=1)) <= 100_000
    sizes = [n_params(create_model(f"cnn-{s}")) for s in ("tiny", "small", "medium")]
    assert sizes == sorted(sizes) and sizes[-1] < n_params(create_model("resnet20"))


@pytest.mark.parametrize("name", ["mobilenetv2", "mobilenetv2-x0.5", "mobilenetv2-x0.35"])
def test_mobilenet_channels_are_multiples_of_8_and_32px_ends_at_4x4(name: str) -> None:
    model = create_model(name).eval()
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, nn.Conv2d))
    shapes = []
    model.head.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert shapes[0][-2:] == (4, 4)


def test_make_divisible() -> None:
    assert [make_divisible(v) for v in (32, 11.2, 16 * 0.35, 24 * 0.5, 1280)] == [32, 16, 8, 16, 1280]


def test_zero_init_residual_makes_blocks_start_as_identity_paths() -> None:
    model = create_model("resnet20", zero_init_residual=True).eval()
    block = model.layer1[1]
    assert isinstance(block, BasicBlock)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(x))
    assert create_model("resnet20").layer1[1].conv2[1].weight.abs().sum() > 0


# ---- registry behaviour and errors


def test_list_models_pattern() -> None:
    assert list_models("resnet*") == sorted(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110))
    assert list_models("wrn-16-*") == ["wrn-16-1", "wrn-16-2", "wrn-16-4"]
    assert list_models("nothing*") == []
    assert list_models() == ALL == sorted(ALL)


def test_unknown_name_suggests_the_close_one() -> None:
    with pytest.raises(KdqError, match=r"unknown model 'resnet21' \(did you mean .*resnet20"):
        create_model("resnet21")
    with pytest.raises(KdqError, match="mobilenetv2"):
        model_info("mobilenet-v2")


def test_unknown_option_names_what_it_takes() -> None:
    with pytest.raises(KdqError) as err:
        create_model("resnet20", foo=1)
    assert str(err.value) == "model 'resnet20' does not take 'foo'; it takes: width, zero_init_residual"
    # The depth is fixed by the name, not an option.
    with pytest.raises(KdqError, match="does not take 'depth'"):
        create_model("resnet20", depth=56)
    with pytest.raises(KdqError, match=r"did you mean width_mult"):
        create_model("mobilenetv2", width_mul=0.5)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("resnet20", {"num_classes": 0}, "num_classes"),
        ("resnet20", {"num_classes": True}, "num_classes"),
        ("resnet20", {"in_channels": 0}, "in_channels"),
        ("resnet20", {"width": 0}, "width"),
        ("resnet20", {"width": -0.5}, "width"),
        ("resnet20", {"width": float("nan")}, "width"),
        ("resnet20", {"zero_init_residual": 1}, "zero_init_residual"),
        ("resnet20", {"width": object()}, "JSON"),
        ("cnn-small", {"width": 0}, "width"),
        ("cnn-small", {"width": 2.5}, "width"),
        ("cnn-small", {"dropout": 1.0}, "dropout"),
        ("wrn-16-1", {"dropout": -0.1}, "dropout"),
        ("mobilenetv2", {"width_mult": 0}, "width_mult"),
        ("mlp", {"hidden": [64, 0]}, "hidden"),
        ("mlp", {"hidden": "64"}, "hidden"),
        ("mlp", {"in_channels": 0}, "in_channels"),
    ],
)
def test_invalid_values_raise_one_line_kdq_errors(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(KdqError, match=match) as err:
        create_model(name, **kwargs)
    assert "\n" not in str(err.value)


def test_family_classes_check_depth() -> None:
    with pytest.raises(KdqError, match="6n\\+2"):
        ResNet(21)
    with pytest.raises(KdqError, match="6n\\+4"):
        WideResNet(18, 2)
