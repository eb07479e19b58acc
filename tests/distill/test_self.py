"""Be Your Own Teacher: the loss against a hand computation, the heads as the objective's parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdq
from kdq.distill.self import SelfDistiller, byot_loss
from kdq.engine import TrainConfig, fit
from kdq.engine.objectives import parts_of
from kdq.errors import KdqError
from kdq.io import load_weights
from kdq.models import create_model
from kdq.rundir.load import load_model
from tests.helpers import Interrupt, assert_same_state, straight_and_resumed


@pytest.fixture(scope="module")
def digits():
    return kdq.load_dataset("digits", subset=300)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_the_loss_matches_a_numpy_computation():
    g = torch.Generator().manual_seed(0)
    deep, f_deep = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    heads = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    feats = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    y = torch.tensor([0, 4, 2, 2])
    t, a, lam = 3.0, 0.3, 0.03
    out = byot_loss(heads, feats, deep, f_deep, y, temperature=t, alpha=a, feature_weight=lam)

    yn, rows = y.numpy(), np.arange(4)
    ce = lambda z: -_log_softmax(z)[rows, yn].mean()  # noqa: E731
    p = np.exp(_log_softmax(deep.numpy() / t))
    expected = ce(deep.numpy())
    for i, (h, f) in enumerate(zip(heads, feats), 1):
        kl = (p * (np.log(p) - _log_softmax(h.numpy() / t))).sum(axis=1).mean() * t * t
        hint = ((f.numpy() - f_deep.numpy()) ** 2).sum(axis=1).mean()
        assert out[f"head{i}_kl"].item() == pytest.approx(kl, rel=1e-6)
        assert out[f"head{i}_feature"].item() == pytest.approx(hint, rel=1e-6)
        assert out[f"head{i}_ce"].item() == pytest.approx(ce(h.numpy()), rel=1e-6)
        expected += (1 - a) * ce(h.numpy()) + a * kl + lam * hint
    assert out["ce"].item() == pytest.approx(ce(deep.numpy()), rel=1e-6)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_gradients_the_heads_learn_and_the_deepest_learns_from_labels_alone():
    g = torch.Generator().manual_seed(1)
    deep = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    f_deep = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    feat = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 0, 3])
    assert torch.autograd.gradcheck(
        lambda h, f: byot_loss([h], [f], deep.detach(), f_deep.detach(), y)["loss"], (head, feat))
    byot_loss([head], [feat], deep, f_deep, y)["loss"].backward()
    ce_only = torch.autograd.grad(torch.nn.functional.cross_entropy(deep, y), deep)[0]
    assert torch.allclose(deep.grad, ce_only)  # the soft targets are detached
    assert f_deep.grad is None or not f_deep.grad.any()  # so is the deepest feature


def test_heads_are_the_objectives_parts_one_per_stage_but_the_deepest(digits):
    torch.manual_seed(0)
    model = create_model("cnn-tiny", 10, 1)
    objective = SelfDistiller()
    assert parts_of(objective) is None  # no heads before prepare
    objective.prepare(model, digits.train, torch.device("cpu"))
    assert objective.layers == ["stage1", "stage2"] and parts_of(objective) is objective
    assert all(k.startswith("heads.") for k in objective.state_dict())
    x, y = digits.train.x[:8], digits.train.y[:8]
    out = objective(model(x), y, x, torch.arange(8))
    assert set(out) == {"loss", "ce", "head1_ce", "head1_kl", "head1_feature", "head2_ce", "head2_kl", "head2_feature"}
    out["loss"].backward()
    assert all(p.grad is not None for p in objective.parameters())


def test_bad_options_and_layers_fail_in_one_line(digits):
    with pytest.raises(KdqError, match=r"alpha must be a number in \[0, 1\]"):
        SelfDistiller(alpha=1.5)
    with pytest.raises(KdqError, match="temperature must be a finite number > 0"):
        SelfDistiller(temperature=0)
    with pytest.raises(KdqError, match="layers must be a non-empty list"):
        SelfDistiller(layers=[])
    with pytest.raises(KdqError, match=r"has no module 'stage9' \(did you mean stage3"):
        SelfDistiller(layers=["stage9"]).prepare(create_model("cnn-tiny", 10, 1), digits.train, torch.device("cpu"))


@pytest.mark.slow
def test_resume_with_heads_is_bit_exact_and_the_saved_model_has_no_heads(digits, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, progress=False, device="cpu")
    steps = len(digits.train) // cfg.batch_size

    def run(out, after, resume=False):  # noqa: ANN001, ANN202
        torch.manual_seed(0 if not resume else 123)  # a resumed process starts from other weights
        model = create_model("cnn-tiny", 10, 1)
        objective = Interrupt(SelfDistiller(), after)
        fit(model, digits, cfg, out, objective=objective, resume=resume)
        return model, objective

    (straight, straight_parts), (resumed, resumed_parts) = straight_and_resumed(run, tmp_path, steps + 2)
    assert_same_state((straight, resumed), (straight_parts, resumed_parts))
    # the stage: a normal float run whose model holds no head; the heads sit in best_objective
    from kdq.stages.self_distill import self_distill

    run_ = self_distill("cnn-tiny", "digits", out=tmp_path / "sd", epochs=1, batch_size=64, progress=False,
                        data_options={"subset": 300})
    assert not any(m._forward_hooks for m in run_.model.modules())  # the taps are off the returned model
    saved = load_weights(tmp_path / "sd" / "model.safetensors")
    assert saved.keys() == create_model("cnn-tiny", 10, 1).state_dict().keys()
    assert any(k.startswith("heads.") for k in load_weights(tmp_path / "sd" / "best_objective.safetensors"))
    load_model(tmp_path / "sd")  # loads strictly into a plain cnn-tiny
