"""The Python entry points, with zoo names and with a user's own nn.Module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdq
from kdq.errors import KdqError

FAST = dict(epochs=1, batch_size=64, progress=False)


@pytest.fixture(scope="module")
def digits():
    return kdq.load_dataset("digits", subset=300)


def test_train_distill_evaluate_load(digits, tmp_path):
    torch.manual_seed(0)  # the model is built before fit() seeds: fix its initial weights too
    teacher = kdq.train("cnn-small", digits, out=tmp_path / "t", **{**FAST, "epochs": 4})
    assert teacher.results["accuracy"] > 0.3 and teacher.dir == tmp_path / "t"

    mine = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    run = kdq.distill(mine, tmp_path / "t", digits, temperature=2.0, alpha=0.9, **FAST)
    assert run.model is mine and run.dir is None
    assert {"train_kd", "train_ce"} <= run.fit.history[0].keys()

    report = kdq.evaluate(mine, digits, speed=False)
    assert sum(sum(row) for row in report["confusion_matrix"]) == len(digits.test)
    assert set(report["per_class_accuracy"]) == set(digits.classes)

    model, meta = kdq.load_model(tmp_path / "t")
    assert meta["classes"] == digits.classes
    torch.testing.assert_close(model.eval()(digits.test.x[:4]), teacher.model.cpu().eval()(digits.test.x[:4]))


def test_teacher_module_with_wrong_classes(digits):
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(KdqError, match="outputs 3 classes"):
        kdq.distill("cnn-tiny", wrong, digits, **FAST)


def test_custom_model_run_needs_its_module(digits, tmp_path):
    mine = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    kdq.train(mine, digits, out=tmp_path / "m", **FAST)
    with pytest.raises(KdqError, match="custom model"):
        kdq.load_model(tmp_path / "m")
    model, _ = kdq.load_model(tmp_path / "m", module=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    torch.testing.assert_close(model[1].weight, mine[1].weight.cpu())


def test_cached_teacher_refuses_mixup(digits, tmp_path):
    kdq.train("cnn-tiny", digits, out=tmp_path / "t", **FAST)
    with pytest.raises(KdqError, match="cached teacher"):
        kdq.distill("cnn-tiny", tmp_path / "t", digits, teacher_mode="cached", mixup=0.2, **FAST)


def test_teacher_from_other_split_is_renormalised(digits, tmp_path):
    """A teacher saved with other normalisation statistics sees inputs in its own units."""
    kdq.train("cnn-tiny", digits, out=tmp_path / "t", **FAST)
    other = kdq.load_dataset("digits", subset=200, seed=5)
    teacher = kdq.rundir.load.load_teacher(tmp_path / "t", other)
    raw = other.test.x[:3] * torch.tensor(other.std).reshape(1, -1, 1, 1) + torch.tensor(other.mean).reshape(1, -1, 1, 1)
    model, meta = kdq.load_model(tmp_path / "t")
    own = (raw - torch.tensor(meta["mean"]).reshape(1, -1, 1, 1)) / torch.tensor(meta["std"]).reshape(1, -1, 1, 1)
    torch.testing.assert_close(teacher.eval()(other.test.x[:3]), model.eval()(own), rtol=1e-4, atol=1e-4)


class _Rows(nn.Module):
    """A user's sequence model: the digits' 8 rows as 8 steps of an LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x.flatten(1).reshape(len(x), 8, 8))[0][:, -1])


def test_evaluate_quantized_modules(digits):
    """Dynamic int8 (LSTM, Linear) and static int8 (FX) modules evaluate, sized as kdq saves them."""
    from kdq.quant import quantize_dynamic, quantize_static

    torch.manual_seed(0)
    for float_model, quantize in (
        (_Rows().eval(), quantize_dynamic),
        (kdq.create_model("cnn-tiny", 10, 1).eval(), lambda m: quantize_static(m, digits.train.x[:64], observer="minmax")),
    ):
        ref = kdq.evaluate(float_model, digits, speed=False)
        got = kdq.evaluate(quantize(float_model), digits)
        assert got["size_bytes"] < ref["size_bytes"] / 2  # int8 weights, not a pickle of packed objects
        assert abs(got["params"] - ref["params"]) <= ref["params"] * 0.01  # packed weights count (BN folded)
        assert got["latency_ms_batch1"] > 0 and "latency_ms_batch1_iqr" in got
