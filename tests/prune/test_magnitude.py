"""Unstructured magnitude pruning: configs that check themselves, layer and global masks, masks
that only grow and survive checkpoint/resume bit for bit, Zhu & Gupta's schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdq.engine import TrainConfig, fit
from kdq.engine.objectives import CrossEntropy
from kdq.errors import KdqError
from kdq.models import create_model
from kdq.prune import (
    GradualSchedule,
    Magnitude,
    attach_masks,
    effective_state,
    make_permanent,
    masked_layers,
    prune_magnitude,
    sparsity_of,
    target_layers,
    update_masks,
)
from tests.conftest import TinyNet
from tests.helpers import Interrupt, assert_same_state, straight_and_resumed


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "x", "0.5", True, math.nan, None])
def test_sparsity_outside_0_1_is_one_line(bad):
    with pytest.raises(KdqError, match=r"sparsity must be a number in \[0, 1\)") as err:
        Magnitude(bad)
    assert "\n" not in str(err.value)


def test_config_checks_scope_and_skip():
    assert Magnitude(0, skip=["fc"]).skip == ("fc",)  # a list from YAML is kept as a tuple
    with pytest.raises(KdqError, match="scope must be layer .* or global"):
        Magnitude(0.5, scope="network")
    with pytest.raises(KdqError, match="skip must be a list of layer names"):
        Magnitude(0.5, skip=[1, 2])


def test_unknown_skip_name_lists_close_names():
    model = create_model("cnn-tiny", 10, 1)
    with pytest.raises(KdqError, match=r"no layer 'fc2' to skip .*did you mean fc\?") as err:
        attach_masks(model, Magnitude(0.5, skip=("fc2",)))
    assert "\n" not in str(err.value)
    with pytest.raises(KdqError, match=r"no layer 'zzz' to skip .*its layers: stage1.0.0"):
        target_layers(model, ["zzz"])
    assert not masked_layers(model)  # refused before any layer was touched


def test_layer_scope_prunes_each_target_alike_and_leaves_bias_and_bn():
    torch.manual_seed(0)
    model = create_model("resnet8", 10, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_magnitude(model, Magnitude(0.75))
    targets = target_layers(model)
    assert "fc" in targets  # the classifier is pruned too, unless skipped
    for name, layer in targets.items():
        assert _zeros(layer.weight) == round(0.75 * layer.weight.numel()), name
        assert report["layers"][name] == pytest.approx(0.75, abs=1 / layer.weight.numel())
        kept = layer.weight != 0  # the survivors are the largest, untouched
        assert torch.equal(layer.weight[kept], before[f"{name}.weight"][kept])
        assert layer.weight[kept].abs().min() >= before[f"{name}.weight"][~kept].abs().max()
    for key, value in model.state_dict().items():
        if not key.endswith(".weight") or key.removesuffix(".weight") not in targets:
            assert torch.equal(value, before[key]), key  # biases, batch norm


def test_global_scope_has_one_threshold():
    torch.manual_seed(0)
    model = create_model("cnn-tiny", 10, 1)
    weights = torch.cat([m.weight.detach().abs().flatten() for m in target_layers(model).values()])
    report = prune_magnitude(model, Magnitude(0.9, scope="global"))
    assert report["sparsity"] == round(0.9 * weights.numel()) / weights.numel()
    threshold = weights.sort().values[round(0.9 * weights.numel()) - 1]
    for layer in target_layers(model).values():
        w = layer.weight.detach()
        assert w[w != 0].abs().min() >= threshold
    assert len({round(s, 3) for s in report["layers"].values()}) > 1  # layers end at different sparsities


def test_skip_a_layer_or_a_block():
    model = create_model("resnet8", 10, 1)
    attach_masks(model, Magnitude(0.5, skip=("fc", "layer1")))
    update_masks(model, 0.5)
    layers = sparsity_of(model)["layers"]
    assert layers["fc"] == 0 and all(s == 0 for n, s in layers.items() if n.startswith("layer1."))
    assert all(s == 0.5 for n, s in layers.items() if n.startswith("layer2."))


def test_masks_only_grow_and_ties_are_deterministic():
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)  # every magnitude ties: the first positions go first
    model = nn.Sequential(layer)
    attach_masks(model, Magnitude(0.25))
    update_masks(model, 0.25)
    assert layer.weight_mask.flatten().tolist() == [0.0] * 4 + [1.0] * 12
    with torch.no_grad():
        layer.weight_orig[0, 0] = 100.0  # a pruned weight that grew under its mask stays pruned
        layer.weight_orig[3, 3] = 1e-3
    update_masks(model, 0.125)  # lower than before: nothing comes back
    mask = layer.weight_mask.flatten()
    assert mask[:4].sum() == 0 and mask[15] == 1 and mask.sum() == 12
    update_masks(model, 0.3125)  # 5 of 16: the smallest survivor goes
    assert layer.weight_mask[3, 3] == 0 and layer.weight_mask.sum() == 11


def test_attach_masks_keeps_zeros_and_make_permanent_restores_keys():
    torch.manual_seed(0)
    model = create_model("cnn-tiny", 10, 1).eval()
    plain_keys = sorted(model.state_dict())  # (a weight made permanent comes after its bias)
    prune_magnitude(model, Magnitude(0.5))  # made permanent
    x = torch.randn(4, 1, 8, 8)
    expected = model(x)
    assert sorted(model.state_dict()) == plain_keys
    masked = attach_masks(model, Magnitude(0.5))
    assert "fc.weight_orig" in model.state_dict() and "fc.weight_mask" in model.state_dict()
    assert all(_zeros(m.weight_mask) == _zeros(m.weight_orig) for m in masked.values())  # zeros stay pruned
    assert sorted(effective_state(model)) == plain_keys
    assert torch.equal(model(x), expected)
    assert sparsity_of(model) == sparsity_of(make_permanent(model))
    assert sorted(model.state_dict()) == plain_keys and not masked_layers(model)


def test_update_without_masks_is_refused():
    with pytest.raises(KdqError, match="call attach_masks"):
        update_masks(create_model("cnn-tiny", 10, 1), 0.5)
    with pytest.raises(KdqError, match="call attach_masks"):
        GradualSchedule(0.5, 4).on_epoch_start(create_model("cnn-tiny", 10, 1))


def test_cubic_schedule():
    schedule = GradualSchedule(0.9, epochs=10, initial=0.1, start=2, end=6)
    # s_t = s_f + (s_i - s_f) * (1 - (t - t0) / n) ** 3 with t0 = 2, n = 4
    expected = [0, 0, 0.1, 0.9 - 0.8 * 0.75**3, 0.9 - 0.8 * 0.5**3, 0.9 - 0.8 * 0.25**3, 0.9, 0.9, 0.9, 0.9]
    assert [schedule.sparsity_at(e) for e in range(10)] == pytest.approx(expected)
    assert GradualSchedule(0.8, epochs=10).end == 5  # half the epochs ramp up, half recover
    assert GradualSchedule(0.8, epochs=1).sparsity_at(0) == 0.8  # one epoch: one-shot


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(final=1.0, epochs=4), "final sparsity must be"),
        (dict(final=0.5, epochs=4, initial=0.6), "initial sparsity 0.6 is above"),
        (dict(final=0.5, epochs=0), "epochs >= 1"),
        (dict(final=0.5, epochs=4, start=4), r"start epoch must be in 0\.\.3"),
        (dict(final=0.5, epochs=4, start=2, end=1), r"must be in 2\.\.3"),
        (dict(final=0.5, epochs=4, end=4), r"must be in 0\.\.3"),
        (dict(final=0.5, epochs=4, scope="all"), "scope must be"),
    ],
)
def test_schedule_refuses_bad_values(options, message):
    with pytest.raises(KdqError, match=message):
        GradualSchedule(**options)


FAST = dict(batch_size=32, lr=0.05, progress=False, warmup_epochs=0.0, device="cpu")


@pytest.mark.slow
def test_gradual_pruning_in_fit_resumes_bit_exactly(toy_data, tmp_path):
    schedule = GradualSchedule(0.8, epochs=4, end=2, scope="global")
    cfg = TrainConfig(epochs=4, **FAST)

    def run(out, after, resume=False):
        torch.manual_seed(0 if not resume else 123)  # a resumed process starts from other weights
        model = TinyNet()
        attach_masks(model, schedule)  # before fit: the checkpoint's keys
        fit(model, toy_data, cfg, out, objective=Interrupt(CrossEntropy(), after), resume=resume,
            on_epoch_start=schedule.on_epoch_start(model))
        return model

    steps = len(toy_data.train) // cfg.batch_size
    # dies in the second epoch, mid-ramp: the resumed run recomputes that epoch's masks from the checkpoint
    straight, resumed = straight_and_resumed(run, tmp_path, steps + 1)
    assert_same_state((straight, resumed))
    last = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in "ab"]
    assert last[0].keys() == last[1].keys() and all(torch.equal(last[0][k], last[1][k]) for k in last[0])
    schedule.finish(straight)  # fit restored the best epoch, which may precede the final sparsity
    assert sparsity_of(straight)["sparsity"] == pytest.approx(0.8, abs=1e-3)
    make_permanent(straight)
    assert sparsity_of(straight)["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_pruned_weights_stay_zero_while_training(toy_data):
    torch.manual_seed(0)
    model = TinyNet()
    attach_masks(model, Magnitude(0.5))
    update_masks(model, 0.5)
    masks = {n: m.weight_mask.clone() for n, m in masked_layers(model).items()}
    fit(model, toy_data, TrainConfig(epochs=1, weight_decay=5e-4, **FAST))
    for name, layer in masked_layers(model).items():
        assert torch.equal(layer.weight_mask, masks[name])
        assert torch.all(layer.weight[masks[name] == 0] == 0)
    assert sparsity_of(model)["layers"]["fc"] == 0.5

