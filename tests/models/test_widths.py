"""Layer widths as data: a pruned model's sizes recorded, rebuilt, and hostile records refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdq.errors import KdqError
from kdq.models import create_model
from kdq.models.widths import apply_widths, check_fits, read_widths
from kdq.schema import Checker

# cnn-tiny's first stage at 5 channels instead of 8, and the second stage's first conv reading them
NARROW = {
    "stage1.0.0": {"in_channels": 1, "out_channels": 5, "groups": 1},
    "stage1.0.1": {"num_features": 5},
    "stage1.1.0": {"in_channels": 5, "out_channels": 5, "groups": 1},
    "stage1.1.1": {"num_features": 5},
    "stage2.0.0": {"in_channels": 5, "out_channels": 16, "groups": 1},
}


def test_create_model_applies_and_records_widths():
    model = create_model("cnn-tiny", 10, 1, widths=NARROW)
    assert model.stage1[0][0].weight.shape == (5, 1, 3, 3) and model.stage2[0][0].weight.shape == (16, 5, 3, 3)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert model.kdq_spec["widths"] == NARROW
    assert read_widths(model, create_model("cnn-tiny", 10, 1)) == NARROW
    rebuilt = create_model(**model.kdq_spec)
    assert rebuilt.kdq_spec == model.kdq_spec
    rebuilt.load_state_dict(model.state_dict())  # same shapes everywhere


def test_unpruned_spec_is_unchanged():
    assert "widths" not in create_model("cnn-tiny", 10, 1).kdq_spec
    assert "widths" not in create_model("cnn-tiny", 10, 1, widths={}).kdq_spec


def test_other_constructor_arguments_are_kept():
    model = nn.Sequential(nn.Conv2d(4, 8, 5, stride=2, padding=3, dilation=2, groups=2, bias=True, padding_mode="reflect"),
                          nn.BatchNorm2d(8, eps=1e-3, momentum=0.3, affine=False), nn.Linear(8, 6, bias=False),
                          nn.BatchNorm1d(6, track_running_stats=False))
    apply_widths(model, {"0": {"in_channels": 4, "out_channels": 6, "groups": 2}, "1": {"num_features": 6},
                         "2": {"in_features": 6, "out_features": 3}, "3": {"num_features": 3}})
    conv, bn, fc, bn1 = model
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode) == \
        ((5, 5), (2, 2), (3, 3), (2, 2), "reflect")
    assert conv.bias is not None and conv.groups == 2 and conv.weight.shape == (6, 2, 5, 5)
    assert (bn.eps, bn.momentum, bn.affine, bn.num_features) == (1e-3, 0.3, False, 6)
    assert fc.bias is None and fc.weight.shape == (3, 6)
    assert bn1.track_running_stats is False and bn1.num_features == 3


def test_widths_on_the_meta_device_allocate_nothing():
    with torch.device("meta"):
        model = create_model("resnet8", 10, 3, widths={"fc": {"in_features": 32, "out_features": 10}})
    assert model.fc.weight.is_meta and model.fc.in_features == 32


@pytest.mark.parametrize("widths, message", [
    ({"stage1.0.0": {"in_channels": 1, "out_channels": 9, "groups": 1}}, r"out_channels must be an integer in 1\.\.8"),
    ({"stage1.0.0": {"in_channels": 1, "out_channels": 0, "groups": 1}}, r"out_channels must be an integer in 1\.\.8"),
    ({"stage1.0.0": {"in_channels": 1, "out_channels": "4", "groups": 1}}, "out_channels must be an integer"),
    ({"stage1.0.0": {"in_channels": 1, "out_channels": 4.0, "groups": 1}}, "out_channels must be an integer"),
    ({"stage1.0.0": {"in_channels": True, "out_channels": 4, "groups": 1}}, "in_channels must be an integer"),
    ({"stage1.0.0": {"out_channels": 4}}, "must give exactly in_channels, out_channels, groups"),
    ({"stage1.0.0": [1, 4, 1]}, "must give exactly"),
    ({"stage1.0.9": {"num_features": 4}}, r"no layer of the model \(did you mean"),
    ({"": {"num_features": 4}}, "no layer of the model"),
    ({"stage1.0.2": {"num_features": 4}}, "names a ReLU"),
    ({"stage1.0.1": {"num_features": 10**12}}, r"must be an integer in 1\.\.8"),
    ([1, 2], "must be a mapping"),
])
def test_hostile_widths_are_one_line(widths, message):
    with pytest.raises(KdqError, match=message) as err:
        create_model("cnn-tiny", 10, 1, widths=widths)
    assert "\n" not in str(err.value) and "prune the model again" in str(err.value)


def test_groups_must_divide_the_channels():
    depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(KdqError, match="groups 4 must divide in_channels 6 and out_channels 6"):
        apply_widths(depthwise, {"0": {"in_channels": 6, "out_channels": 6, "groups": 4}})
    apply_widths(depthwise, {"0": {"in_channels": 6, "out_channels": 6, "groups": 6}})
    assert depthwise[0].weight.shape == (6, 1, 3, 3)


def test_a_bad_entry_changes_nothing():
    model = create_model("cnn-tiny", 10, 1)
    with pytest.raises(KdqError):
        apply_widths(model, {"stage1.0.0": {"in_channels": 1, "out_channels": 4, "groups": 1}, "nope": {}})
    assert model.stage1[0][0].out_channels == 8


def test_widths_that_do_not_fit_together_fail_in_one_line():
    model = create_model("cnn-tiny", 10, 1, widths={"stage1.0.0": {"in_channels": 1, "out_channels": 5, "groups": 1}})
    with pytest.raises(KdqError, match="the recorded layer widths do not fit together"):
        check_fits(model, [1, 8, 8])
    check_fits(create_model("cnn-tiny", 10, 1, widths=NARROW), [1, 8, 8])


def test_read_widths_refuses_what_it_cannot_record():
    class Normed(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(width)

    with pytest.raises(KdqError, match="'norm' .*LayerNorm.* changed shape"):
        read_widths(Normed(4), Normed(8))


def test_schema_bounds_the_widths_record():
    check = Checker("model.json")
    spec = {"name": "cnn-tiny", "num_classes": 10, "in_channels": 1, "kwargs": {}, "widths": NARROW}
    assert check.model_spec(spec, "architecture") is spec
    for bad, message in [
        ({"a": {"out_channels": 2**30}}, r"architecture\.widths\['a'\]\.out_channels must be an integer in 1\.\.16777216"),
        ({"a": {"colour": 3}}, "key must be one of"),
        ({"a": 3}, "must be a JSON object"),
        ("a", "must be a JSON object"),
        ({"x" * 2000: {"out_channels": 3}}, "a layer name of at most 1000 characters"),
        ({str(i): {} for i in range(100_001)}, "at most 100000 layers"),
    ]:
        with pytest.raises(KdqError, match=message):
            check.model_spec({**spec, "widths": bad}, "architecture")
