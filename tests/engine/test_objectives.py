"""Objectives with their own trainable parts: optimizer, checkpoint, best epoch, bit-exact resume."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdq.distill import FeatureTaps, freeze
from kdq.engine import TrainConfig, fit
from kdq.engine import train as train_module
from kdq.engine.objectives import Objective
from kdq.errors import KdqError
from tests.conftest import TinyNet

FAST = dict(batch_size=32, lr=0.1, progress=False, warmup_epochs=0.0, device="cpu")


class Hint(Objective):
    """FitNets-like: cross-entropy + MSE between the student's BN output, through a 1x1 conv + BN
    adapter (the part, with buffers), and a frozen teacher's ReLU output; both tapped by name."""

    def __init__(self, teacher: nn.Module, stop_at: int | None = None) -> None:
        super().__init__()
        self.hold("teacher", freeze(teacher))
        self.teacher_taps = FeatureTaps(teacher, ["features.2"])
        self.adapter = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.stop_at, self.steps = stop_at, 0  # a Ctrl-C at that step

    def prepare(self, model, train, device):
        super().prepare(model, train, device)
        self.teacher.to(device)
        self.student_taps = FeatureTaps(model, ["features.1"])

    def forward(self, logits, targets, inputs, indices):
        self.steps += 1
        if self.steps == self.stop_at:
            raise KeyboardInterrupt
        with torch.no_grad():
            self.teacher(inputs)
        hint = F.mse_loss(self.adapter(self.student_taps.features["features.1"]), self.teacher_taps.features["features.2"])
        ce = F.cross_entropy(logits, targets)
        return {"loss": ce + hint, "ce": ce, "hint": hint}


def _teacher() -> TinyNet:
    torch.manual_seed(7)
    return TinyNet()


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_optimizer_trains_the_parts_and_the_terms_are_logged(toy_data):
    torch.manual_seed(0)
    model, hint = TinyNet(), Hint(_teacher())
    before = {k: v.clone() for k, v in hint.adapter.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in hint.teacher.state_dict().items()}
    result = fit(model, toy_data, TrainConfig(epochs=1, **FAST), objective=hint)
    assert not torch.equal(before["0.weight"], hint.adapter[0].weight)  # trained
    assert not torch.equal(before["1.running_mean"], hint.adapter[1].running_mean)  # in train mode
    assert all(torch.equal(v, hint.teacher.state_dict()[k]) for k, v in teacher_before.items())  # held, frozen
    assert list(hint.state_dict()) == [f"adapter.{k}" for k in before]  # the teacher is not a part
    assert {"train_ce", "train_hint"} <= result.history[0].keys()


def test_resume_reaches_the_same_model_and_parts(toy_data, tmp_path):
    # Bit-for-bit on the CPU: the adapter's weights, BN statistics and momentum are checkpointed.
    cfg = TrainConfig(epochs=2, **FAST)
    torch.manual_seed(0)
    straight, straight_hint = TinyNet(), Hint(_teacher())
    fit(straight, toy_data, cfg, tmp_path / "a", objective=straight_hint)

    torch.manual_seed(0)
    steps_per_epoch = len(toy_data.train) // cfg.batch_size
    with pytest.raises(KeyboardInterrupt):  # dies in the middle of epoch 2
        fit(TinyNet(), toy_data, cfg, tmp_path / "b", objective=Hint(_teacher(), steps_per_epoch + 2))

    torch.manual_seed(123)  # a fresh process: different initial weights, adapter and RNG state
    resumed, resumed_hint = TinyNet(), Hint(_teacher())
    result = fit(resumed, toy_data, cfg, tmp_path / "b", objective=resumed_hint, resume=True)
    assert result.epochs_run == 2
    assert _equal(straight, resumed) and _equal(straight_hint, resumed_hint)  # the best epoch's
    best = train_module.load_weights(tmp_path / "b" / train_module.BEST_OBJECTIVE)
    assert all(torch.equal(best[k], v) for k, v in resumed_hint.state_dict().items())
    # the last epoch's, whichever epoch was best: model, adapter and the optimizer's momentum
    a, b = (torch.load(tmp_path / run / train_module.CHECKPOINT, weights_only=True) for run in "ab")
    for key in ("model", "objective"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert len(a["objective"]) == 7  # conv weight and bias, BN affine and statistics
    momenta = [(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
               for i, s in a["optimizer"]["state"].items()]
    assert len(momenta) == len(list(straight.parameters())) + 4 and all(torch.equal(x, y) for x, y in momenta)


@pytest.mark.parametrize("on_disk", [True, False])
def test_the_best_epochs_parts_come_back(toy_data, tmp_path, monkeypatch, on_disk):
    scores = iter([0.5, 0.4])  # epoch 1 is the best
    monkeypatch.setattr(train_module, "_val_metrics", lambda *a: (next(scores), 1.0))
    torch.manual_seed(0)
    hint = Hint(_teacher())
    after_first: dict[str, torch.Tensor] = {}

    def snapshot(epoch):
        if epoch == 1:
            after_first.update({k: v.clone() for k, v in hint.state_dict().items()})

    fit(TinyNet(), toy_data, TrainConfig(epochs=2, **FAST), tmp_path if on_disk else None, objective=hint,
        on_epoch_start=snapshot)
    assert after_first and all(torch.equal(v, hint.state_dict()[k]) for k, v in after_first.items())


def test_a_checkpoint_without_objective_parts_still_resumes(toy_data, tmp_path):
    torch.manual_seed(0)
    fit(TinyNet(), toy_data, TrainConfig(epochs=1, **{**FAST, "schedule": "constant"}), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt.pop("objective") == {}
    torch.save(ckpt, tmp_path / "checkpoint.pt")  # as kdq wrote it before objectives had parts
    result = fit(TinyNet(), toy_data, TrainConfig(epochs=2, **{**FAST, "schedule": "constant"}), tmp_path, resume=True)
    assert result.epochs_run == 2 and [r["epoch"] for r in result.history] == [1, 2]
    # ...but an objective with parts needs them: one KdqError line, not a half-restored run
    with pytest.raises(KdqError, match="does not fit"):
        fit(TinyNet(), toy_data, TrainConfig(epochs=3, **{**FAST, "schedule": "constant"}), tmp_path,
            objective=Hint(_teacher()), resume=True)


def test_a_damaged_objective_state_is_one_error_line(toy_data, tmp_path):
    torch.manual_seed(0)
    fit(TinyNet(), toy_data, TrainConfig(epochs=1, **FAST), tmp_path, objective=Hint(_teacher()))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["objective"]["adapter.0.weight"] = "not a tensor"
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(KdqError, match=r"objective\.adapter\.0\.weight must be a tensor"):
        fit(TinyNet(), toy_data, TrainConfig(epochs=2, **FAST), tmp_path, objective=Hint(_teacher()), resume=True)


def test_an_objective_may_not_own_the_model_it_trains(toy_data):
    class Owns(Objective):
        def __init__(self, model):
            super().__init__()
            self.model = model  # registered: a part, so the model's parameters twice over

        def forward(self, logits, targets, inputs, indices):
            ce = F.cross_entropy(logits, targets)
            return {"loss": ce}

    model = TinyNet()
    with pytest.raises(KdqError, match="Objective.hold"):
        fit(model, toy_data, TrainConfig(epochs=1, **FAST), objective=Owns(model))


def test_an_unknown_feature_name_fails_before_training(toy_data):
    class Tapped(Hint):
        def prepare(self, model, train, device):
            FeatureTaps(model, ["features.9"])

    with pytest.raises(KdqError, match="no module 'features.9'"):
        fit(TinyNet(), toy_data, TrainConfig(epochs=1, **FAST), objective=Tapped(_teacher(), stop_at=1))
