import json

import pytest
import torch

from kdq.engine import TrainConfig, fit, predict
from kdq.engine import train as train_module
from tests.conftest import TinyNet

FAST = dict(batch_size=32, lr=0.1, progress=False, warmup_epochs=0.0)


def _state_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_learns_and_logs(toy_data, tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    result = fit(model, toy_data, TrainConfig(epochs=4, **FAST), tmp_path)
    assert result.best_val_accuracy > 0.6  # chance is 0.25
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3, 4]
    assert {"train_loss", "train_ce", "train_accuracy", "val_accuracy", "lr", "images_per_s"} <= lines[0].keys()
    # the model returned holds the best epoch's weights
    acc = (predict(model, toy_data.val.x).argmax(1).cpu() == toy_data.val.y).float().mean().item()
    assert acc == pytest.approx(result.best_val_accuracy)


class _Interrupt:
    """Cross-entropy that raises KeyboardInterrupt at a given step, as a user's Ctrl-C would."""

    def __init__(self, at_step):
        self.at_step, self.steps = at_step, 0

    def __call__(self, logits, targets, inputs, indices):
        self.steps += 1
        if self.steps == self.at_step:
            raise KeyboardInterrupt
        ce = torch.nn.functional.cross_entropy(logits, targets)
        return {"loss": ce, "ce": ce}


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_resume_reaches_same_weights(toy_data, tmp_path, schedule):
    # Bit-for-bit equality is promised on the CPU; CUDA kernels may reorder float sums.
    cfg = TrainConfig(epochs=4, schedule=schedule, device="cpu", **FAST)
    torch.manual_seed(0)
    straight = TinyNet()
    fit(straight, toy_data, cfg, tmp_path / "a")

    torch.manual_seed(0)
    steps_per_epoch = len(toy_data.train) // cfg.batch_size
    with pytest.raises(KeyboardInterrupt):  # dies in the middle of epoch 3
        fit(TinyNet(), toy_data, cfg, tmp_path / "b", objective=_Interrupt(2 * steps_per_epoch + 3))
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2

    torch.manual_seed(123)  # a fresh process: different initial weights and RNG state
    resumed = TinyNet()
    result = fit(resumed, toy_data, cfg, tmp_path / "b", resume=True)
    assert result.epochs_run == 4
    assert _state_equal(straight.state_dict(), resumed.state_dict())  # the best epoch's (here epoch 1)
    last = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"] for run in "ab"]
    assert _state_equal(*last)  # the last epoch's, trained after the interruption
    a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in a] == [r["val_accuracy"] for r in b]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


def test_early_stopping_keeps_best(toy_data, monkeypatch):
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1])
    monkeypatch.setattr(train_module, "_val_metrics", lambda *a: (next(scores), 1.0))
    result = fit(TinyNet(), toy_data, TrainConfig(epochs=5, patience=2, **FAST))
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1


def test_mixup_cutmix_and_adamw_run(toy_data):
    cfg = TrainConfig(epochs=1, mixup=0.2, cutmix=1.0, optimizer="adamw", lr=1e-3, label_smoothing=0.1,
                      **{k: v for k, v in FAST.items() if k != "lr"})
    result = fit(TinyNet(), toy_data, cfg)
    assert result.epochs_run == 1 and 0 <= result.best_val_accuracy <= 1
