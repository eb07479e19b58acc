"""Structured channel pruning: channels really removed, as asked, ranked as asked; a pruned zoo
model saved, reloaded, quantized and exported like any run; bad input refused in one line."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

import kdq
from kdq.engine import count_macs, count_params
from kdq.errors import KdqError
from kdq.prune.channels import Channels, prune_channels
from kdq.rundir.layout import write_config
from kdq.rundir.load import data_meta, data_record, load_model, save_model
from kdq.stages.evaluate import evaluate_onnx_file

FAST = dict(epochs=1, batch_size=64, progress=False)
ZOO = [("resnet8", (3, 8, 8)), ("wrn-16-1", (3, 8, 8)), ("cnn-tiny", (1, 8, 8)), ("mlp-small", (20,)),
       pytest.param("mobilenetv2-x0.35", (3, 8, 8), marks=pytest.mark.slow)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _model(name: str, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    return kdq.create_model(name, 10, shape[0]), torch.randn(4, *shape)


@pytest.mark.parametrize("name, shape", ZOO)
def test_half_the_channels_of_every_layer(name, shape):
    model, x = _model(name, shape)
    report = prune_channels(model, x, Channels(ratio=0.5))
    model.eval()
    assert model(x).shape == (4, 10) and model.fc.out_features == 10  # the classifier keeps its classes
    assert report["classifier"] == "fc" and report["layers"]["fc"] == {"kept": 10, "of": 10}
    for layer, sizes in report["layers"].items():
        if layer != "fc":  # floor(0.5 x n) of each layer's n channels removed, residual groups alike
            assert sizes["kept"] == sizes["of"] - sizes["of"] // 2, layer
    assert report["params_after"] == count_params(model) and report["macs_after"] == count_macs(model, x)
    # a convolution loses half its inputs and half its outputs: about 4x fewer MACs
    low, high = (1.9, 2.1) if name == "mlp-small" else (3.2, 4.2)
    assert low < report["macs_reduction"] < high and report["params_reduction"] > low * 0.9
    rebuilt = kdq.create_model(**model.kdq_spec).eval()  # the widths are data: no pickle
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x), model(x))


def test_ratio_zero_changes_nothing_and_leaves_the_mode():
    model, x = _model("resnet8", (3, 8, 8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_channels(model, x, Channels(ratio=0.0))
    assert model.training and report["macs_reduction"] == 1.0 and "widths" not in model.kdq_spec
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched


def _dead_half(model: nn.Module) -> None:
    """Half of mlp-small's hidden units do nothing: zero weights in and out."""
    with torch.no_grad():
        model.body[0][0].weight[::2] = 0
        model.fc.weight[:, ::2] = 0


@pytest.mark.parametrize("importance, scope", [("l1", "layer"), ("l2", "layer"), ("l2", "global"), ("taylor", "layer")])
def test_the_weakest_channels_go(importance, scope):
    model, x = _model("mlp-small", (20,))
    _dead_half(model)
    expected = model.eval()(x)
    batches = [(x, torch.randint(0, 10, (4,)))] if importance == "taylor" else None
    prune_channels(model, x, Channels(ratio=0.5, importance=importance, scope=scope), batches=batches)
    assert model.fc.in_features == 32
    assert torch.allclose(model(x), expected, atol=1e-6)  # exactly the dead units were removed


def test_taylor_leaves_no_gradients_and_frozen_layers_frozen():
    model, x = _model("cnn-tiny", (1, 8, 8))
    model.stage1.requires_grad_(False)
    prune_channels(model, x, Channels(ratio=0.5, importance="taylor"), batches=[(x, torch.arange(4))] * 2)
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.stage1.parameters()) and model.fc.weight.requires_grad


def test_same_seed_same_pruned_model():
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model, x = _model("resnet8", (3, 8, 8))
        report = prune_channels(model, x, Channels(macs=2.0, scope="global"))
        runs.append((report, model.kdq_spec, model.state_dict()))
    (r1, s1, w1), (r2, s2, w2) = runs
    assert r1 == r2 and s1 == s2 and w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_bn_importance_removes_channels_whose_scale_is_zero():
    model, x = _model("cnn-tiny", (1, 8, 8))
    with torch.no_grad():  # four channels of the first layer output zero after their batch norm
        model.stage1[0][1].weight[:4] = 0
        model.stage1[0][1].bias[:4] = 0
    model.eval()
    expected = model(x)
    report = prune_channels(model, x, Channels(ratio=0.5, importance="bn", skip=("stage1.1", "stage2", "stage3")))
    assert report["layers"]["stage1.0.0"] == {"kept": 4, "of": 8} and report["layers"]["stage1.1.0"]["kept"] == 8
    assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize("config, low, high", [
    (Channels(macs=2.0, scope="global"), 1.96, 2.04),  # one channel (of a coupled group) at a time
    (Channels(macs=2.0), 1.98, 2.02),  # one ratio for every layer, the last step one group at a time
    (Channels(macs=1.5), 1.47, 1.53),
    (Channels(params=3.0, scope="global"), 2.94, 3.06),
])
def test_a_reduction_target_is_reached(config, low, high):
    model, x = _model("resnet8", (3, 8, 8))
    report = prune_channels(model, x, config)
    key = "macs" if config.macs else "params"
    assert low < report[f"{key}_reduction"] < high, report
    assert report["target"] == {key: config.macs or config.params} and 0 < report["removed"] < 1
    assert report["ratio"] is None


@pytest.mark.parametrize("config", [Channels(macs=2.0, round_to=8), Channels(ratio=0.3, round_to=4, scope="global"),
                                    Channels(params=2.0, round_to=8, scope="global")])
def test_round_to_keeps_widths_a_multiple(config):
    model, x = _model("wrn-16-1", (3, 8, 8))
    report = prune_channels(model, x, config)
    kept = {layer: s["kept"] for layer, s in report["layers"].items() if layer != "fc"}
    assert all(k % config.round_to == 0 or k == report["layers"][layer]["of"] for layer, k in kept.items()), kept
    assert any(k < report["layers"][layer]["of"] for layer, k in kept.items())  # it still prunes
    if config.target:  # still near the target: the search steps a group by round_to channels
        key, factor = config.target
        assert factor * 0.85 < report[f"{key}_reduction"] < factor * 1.15, report
    assert report["round_to"] == config.round_to
    rebuilt = kdq.create_model(**model.kdq_spec).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x), model.eval()(x))


def test_round_to_never_widens_a_layer():
    model, x = _model("cnn-tiny", (1, 8, 8))  # 8- and 16-channel layers
    report = prune_channels(model, x, Channels(ratio=0.5, round_to=16))
    assert report["layers"]["stage1.0.0"] == {"kept": 8, "of": 8}  # 4 rounds up to 16, capped at 8
    assert report["layers"]["stage2.0.0"] == {"kept": 16, "of": 16}


def test_skip_keeps_a_blocks_outputs():
    model, x = _model("cnn-tiny", (1, 8, 8))
    report = prune_channels(model, x, Channels(ratio=0.5, skip=("stage1",)))
    assert report["layers"]["stage1.0.0"]["kept"] == report["layers"]["stage1.1.0"]["kept"] == 8
    assert report["layers"]["stage2.0.0"] == {"kept": 8, "of": 16}


def test_every_layer_keeps_a_channel():
    model, x = _model("cnn-tiny", (1, 8, 8))
    report = prune_channels(model, x, Channels(ratio=0.99))
    assert all(sizes["kept"] >= 1 for sizes in report["layers"].values())
    assert report["layers"]["stage1.0.0"]["kept"] == 1  # floor(0.99 x 8) = 7 of 8 removed
    model, x = _model("cnn-tiny", (1, 8, 8))
    report = prune_channels(model, x, Channels(ratio=0.99, scope="global"))
    assert all(sizes["kept"] >= 1 for sizes in report["layers"].values())
    assert model.eval()(x).shape == (4, 10)


class UserNet(nn.Module):
    """A user's module: a residual addition over a grouped conv, then a flatten into the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.c = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16 * 2 * 2, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.a(x)))
        h = h + self.c(torch.relu(self.b(h)))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_users_module_is_pruned(scope):
    model, x = UserNet(), torch.randn(4, 3, 8, 8)
    report = prune_channels(model, x, Channels(ratio=0.5, scope=scope))
    assert report["classifier"] == "head" and model.head.out_features == 7
    assert model.a.out_channels == model.c.out_channels < 16  # the residual addition keeps them equal
    assert model.head.in_features == model.c.out_channels * 4  # the flatten follows the channels
    assert model.b.groups == 2 and model(x).shape == (4, 7) and report["macs_reduction"] > 2
    assert not hasattr(model, "kdq_spec")  # nothing to rebuild it from: the user's class does that


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=1.0), r"ratio must be a number in \[0, 1\)"),
    (dict(ratio=-0.1), r"ratio must be a number in \[0, 1\)"),
    (dict(ratio=float("nan")), r"ratio must be a number in \[0, 1\)"),
    (dict(ratio="half"), r"ratio must be a number"),
    (dict(ratio=0.5, macs=2.0), "give exactly one of ratio .* got ratio and macs"),
    (dict(), "give exactly one of ratio .* got none"),
    (dict(macs=1.0), "macs must be a reduction factor > 1"),
    (dict(params=0.5), "params must be a reduction factor > 1"),
    (dict(ratio=0.5, importance="l3"), r"unknown importance 'l3' \(did you mean"),
    (dict(ratio=0.5, scope="model"), "scope must be layer"),
    (dict(ratio=0.5, skip=[3]), "skip must be a list of layer names"),
    (dict(ratio=0.5, round_to=0), "round_to must be a whole number from 1"),
    (dict(ratio=0.5, round_to=2.5), "round_to must be a whole number from 1"),
])
def test_bad_configs_are_one_line(kwargs, message):
    with pytest.raises(KdqError, match=message) as err:
        Channels(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_calls_are_one_line_and_change_nothing():
    model, x = _model("resnet8", (3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call, message in [
        (lambda: prune_channels(model, x, Channels(ratio=0.5, skip=("layer1.0.conv",))),
         r"skip names 'layer1.0.conv', which is no module of ResNet \(did you mean"),
        (lambda: prune_channels(model, x, Channels(ratio=0.5, importance="taylor")), "taylor .* pass batches="),
        (lambda: prune_channels(model, x, Channels(ratio=0.5, importance="taylor"), batches=[]), "batches is empty"),
        (lambda: prune_channels(model, x, Channels(ratio=0.5, importance="taylor"), batches=[(x,)]),
         r"batches must give \(inputs, labels\) pairs"),
        (lambda: prune_channels(model, x, Channels(macs=1000.0)), "1000x fewer MACs is out of reach"),
        (lambda: prune_channels(model, torch.randn(2, 5, 8, 8), Channels(ratio=0.5)), "does not take the example inputs"),
        (lambda: prune_channels(model, x, {"ratio": 0.5}), "config must be a kdq.prune.Channels"),
        (lambda: prune_channels(kdq.create_model("mlp-small", 10, 20), torch.randn(2, 20), Channels(ratio=0.5, importance="bn")),
         "importance bn .* has no batch norm"),
    ]:
        with pytest.raises(KdqError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- a pruned zoo model is a run like any other


@pytest.fixture(scope="module")
def digits():
    return kdq.load_dataset("digits", subset=300)


def _pruned_run(name: str, digits, root) -> tuple[nn.Module, torch.Tensor]:  # noqa: ANN001
    model = kdq.create_model(name, digits.num_classes, digits.input_shape[0])
    prune_channels(model, digits.train.x[:8], Channels(ratio=0.5))
    save_model(root / "pruned", model, data_meta(digits))
    write_config(root / "pruned", {"command": "prune", "data": data_record(digits), "model": model.kdq_spec})
    return model.eval(), digits.test.x


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2-x0.35", "cnn-tiny"])
def test_a_pruned_run_reloads_identically_without_pickle(name, digits, tmp_path, monkeypatch):
    model, x = _pruned_run(name, digits, tmp_path)
    for module, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, attr, lambda *a, **k: pytest.fail("pickle used"))
    loaded, meta = load_model(tmp_path / "pruned")
    assert meta["architecture"]["widths"] == model.kdq_spec["widths"]
    assert torch.equal(loaded.eval()(x), model(x))
    assert sorted(p.name for p in (tmp_path / "pruned").iterdir()) == ["config.yaml", "model.json", "model.safetensors"]


def _tamper(run, edit) -> None:  # noqa: ANN001
    import json

    path = run / "model.json"
    meta = json.loads(path.read_text())
    edit(meta["architecture"]["widths"])
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, message", [
    (lambda w: w["fc"].update(in_features=10**6), r"widths\['fc'\].in_features must be an integer in 1..64"),
    (lambda w: w["fc"].update(in_features="32"), r"architecture.widths\['fc'\].in_features must be an integer"),
    (lambda w: w.update({"layer9.conv": {"num_features": 3}}), "'layer9.conv', which is no layer of the model"),
    (lambda w: w.update({"stem.0": {"num_features": 3}}), "must give exactly in_channels, out_channels, groups"),
    (lambda w: w["fc"].update(in_features=31), "the recorded layer widths do not fit together"),
])
def test_hostile_widths_in_model_json_are_one_line(edit, message, digits, tmp_path):
    _pruned_run("resnet8", digits, tmp_path)
    _tamper(tmp_path / "pruned", edit)
    with pytest.raises(KdqError, match=message) as err:
        load_model(tmp_path / "pruned")
    assert "\n" not in str(err.value) and str(tmp_path / "pruned" / "model.json") in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2-x0.35"])
def test_a_pruned_run_goes_through_int8_qat_lowbit_and_onnx(name, digits, tmp_path):
    model, x = _pruned_run(name, digits, tmp_path)
    run = tmp_path / "pruned"
    macs = count_macs(model, x)
    float_results = kdq.evaluate(run, speed=False)
    assert float_results["macs"] == macs

    int8 = kdq.quantize(run, tmp_path / "int8", calibration_batches=1, batch_size=32)
    assert int8["macs"] == macs and kdq.evaluate(tmp_path / "int8", speed=False)["accuracy"] == int8["accuracy"]
    qat = kdq.qat(run, tmp_path / "qat", **FAST)
    assert qat["macs"] == macs and kdq.evaluate(tmp_path / "qat", speed=False)["accuracy"] == qat["accuracy"]
    lowbit = kdq.qat(run, tmp_path / "w4", bits="w4a4", **FAST)
    assert lowbit["macs"] == macs and kdq.evaluate(tmp_path / "w4", speed=False)["accuracy"] == lowbit["accuracy"]

    info = kdq.export(run, tmp_path / "pruned.onnx")
    assert info["float_agreement"] >= 0.999
    ort = evaluate_onnx_file(tmp_path / "pruned.onnx", speed=False)
    assert ort["macs"] == macs and ort["sparsity"] == 0.0
    assert math.isclose(ort["accuracy"], float_results["accuracy"], abs_tol=0.01)
    info = kdq.export(tmp_path / "int8", tmp_path / "int8.onnx")
    assert evaluate_onnx_file(tmp_path / "int8.onnx", speed=False)["macs"] == macs
