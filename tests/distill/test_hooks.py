import pytest
import torch

from kdq.distill import FeatureTaps
from kdq.errors import KdqError
from tests.conftest import TinyNet


def test_an_unknown_name_fails_at_once_listing_valid_names():
    model = TinyNet()
    with pytest.raises(KdqError) as err:
        FeatureTaps(model, ["features.1", "featurs.0"])
    message = str(err.value)
    assert "\n" not in message and "'featurs.0'" in message
    assert "did you mean features.0" in message and "fc" in message  # close names, then the listing
    assert not any(m._forward_hooks for m in model.modules())  # nothing left behind


def test_features_are_captured_each_forward_and_hooks_removed():
    model = TinyNet().eval()
    taps = FeatureTaps(model, ["features.0", "fc"])
    x = torch.randn(3, 1, 8, 8)
    logits = model(x)
    assert taps.features["features.0"].shape == (3, 8, 8, 8)
    assert torch.equal(taps.features["fc"], logits)
    first = taps.features["features.0"]
    model(torch.randn(2, 1, 8, 8))
    assert taps.features["features.0"] is not first and taps.features["features.0"].shape[0] == 2
    taps.remove()
    assert taps.features == {} and not any(m._forward_hooks for m in model.modules())
    model(x)
    assert taps.features == {}


def test_features_keep_their_graph_and_the_context_removes_the_hooks():
    model = TinyNet()
    with FeatureTaps(model, "features.0") as taps:
        model(torch.randn(2, 1, 8, 8))
        taps.features["features.0"].square().mean().backward()
    assert model.features[0].weight.grad is not None
    assert not any(m._forward_hooks for m in model.modules())
