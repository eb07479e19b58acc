"""The distillation objective: methods by name, weighted sums, feature taps and their parts."""

from __future__ import annotations

import json
import re

import pytest
import torch

import kdq
from kdq.cli import main
from kdq.distill import Distiller, method_losses, method_spec
from kdq.engine import TrainConfig, fit
from kdq.errors import KdqError
from kdq.models import create_model
from kdq.rundir.layout import read_config
from tests.helpers import Interrupt, assert_same_state, straight_and_resumed

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--subset", "300"]


@pytest.fixture(scope="module")
def digits():
    return kdq.load_dataset("digits", subset=300)


def _prepared(method, digits, **kwargs):
    torch.manual_seed(0)
    student, teacher = create_model("cnn-tiny", 10, 1), create_model("cnn-small", 10, 1)
    objective = Distiller(teacher, method_losses(method), "online", **kwargs)
    objective.prepare(student, digits.train, torch.device("cpu"))
    return student, teacher, objective


def test_a_weighted_sum_adds_each_methods_loss_and_ce_once(digits):
    student, teacher, objective = _prepared({"kd": 1.0, "at": 1000}, digits)
    x, y = digits.train.x[:8], digits.train.y[:8]
    out = objective(student(x), y, x, torch.arange(8))
    kd = method_losses("kd")["kd"][0](student(x), teacher(x), y)
    assert set(out) >= {"loss", "kd", "ce", "at"}
    assert out["loss"].item() == pytest.approx(kd["loss"].item() + 1000 * out["at"].item(), rel=1e-5)


def test_a_feature_method_alone_gets_cross_entropy_added(digits):
    student, _, objective = _prepared("at", digits)
    x, y = digits.train.x[:8], digits.train.y[:8]
    logits = student(x)
    out = objective(logits, y, x, torch.arange(8))
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert out["ce"].item() == pytest.approx(ce.item())
    assert out["loss"].item() == pytest.approx(ce.item() + 1000 * out["at"].item(), rel=1e-5)


def test_adapters_are_parts_built_at_setup(digits):
    _, _, objective = _prepared("fitnet", digits)  # cnn-tiny (width 8) against cnn-small (width 16+)
    assert sum(p.numel() for p in objective.parameters()) > 0


@pytest.mark.parametrize("method, options, message", [
    ("kdd", (), "unknown distillation method 'kdd' (did you mean kd"),
    ({"kd": -1}, (), "weight must be a finite number >= 0"),
    ({"kd": 0, "at": 0}, (), "every method's weight is 0"),
    ({"kd": {"tau": 2}}, (), "method 'kd' has no option 'tau'"),
])
def test_bad_methods_are_refused_in_one_line(method, options, message):
    with pytest.raises(KdqError, match=message.replace("(", r"\(")) as err:
        method_losses(method)
    assert "\n" not in str(err.value)


def test_feature_methods_refuse_the_cached_teacher():
    with pytest.raises(KdqError, match="cached teacher does not keep"):
        Distiller(torch.nn.Identity(), method_losses("at"), "cached")


def test_the_cli_spec():
    assert method_spec(["dkd"]) == "dkd"
    assert method_spec(["kd", "at=1000"], ["kd.temperature=2"]) == {"kd": {"temperature": 2}, "at": {"weight": 1000}}
    with pytest.raises(KdqError, match="names method 'dkd', which no --method gives"):
        method_spec(["kd"], ["dkd.beta=8"])


def test_unknown_layer_fails_before_training(digits):
    with pytest.raises(KdqError, match="has no module 'stage9'"):
        _prepared("at", digits, features=[("stage9", "stage3")])


@pytest.mark.slow
def test_distill_with_a_feature_method_end_to_end(tmp_path, capsys):
    data = ["--data", "digits"]
    assert main(["train", "--model", "cnn-small", *data, *FAST, "--out", str(tmp_path / "t")]) == 0
    common = ["distill", "--model", "cnn-tiny", "--teacher", str(tmp_path / "t"), *data, *FAST]
    assert main([*common, "--method", "fitnet", "--method", "kd", "--out", str(tmp_path / "s")]) == 0
    run = tmp_path / "s"
    assert (run / "best_objective.safetensors").exists()  # the adapters: kept beside, never in the student
    saved = kdq.io.load_weights(run / "model.safetensors")
    assert not any("adapter" in k for k in saved)
    metrics = (run / "metrics.jsonl").read_text()
    assert "train_hint" in metrics and "train_kd" in metrics
    capsys.readouterr()
    assert main([*common, "--method", "at", "--teacher-mode", "cached", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cached teacher does not keep" in err and not (tmp_path / "c").exists()


def test_hint_epochs_train_the_hints_alone_then_the_rest(digits):
    """FitNets' two stages: hint terms only (no CE, no KD), then KD and CE without the hints."""
    student, teacher, objective = _prepared({"fitnet": 100, "kd": 1}, digits, hint_epochs=1)
    x, y = digits.train.x[:8], digits.train.y[:8]
    objective.start_epoch(0)
    out = objective(student(x), y, x, torch.arange(8))
    assert "hint" in out and "kd" not in out and "ce" not in out
    assert out["loss"].item() == pytest.approx(100 * out["hint"].item(), rel=1e-5)
    out["loss"].backward()
    assert torch.count_nonzero(student.fc.weight.grad) == 0  # past the hinted layer: in the graph, untaught
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.parameters())
    objective.start_epoch(1)
    out = objective(student(x), y, x, torch.arange(8))
    assert "hint" not in out and {"kd", "ce"} <= set(out)
    kd = method_losses("kd")["kd"][0](student(x), teacher(x), y)
    assert out["loss"].item() == pytest.approx(kd["loss"].item(), rel=1e-5)


@pytest.mark.parametrize("method, hint_epochs, epochs, message", [
    ("kd", 1, 3, "hint_epochs trains feature methods first, but none is given"),
    ("fitnet", 1, 3, "hint_epochs needs a method for the epochs after the hints"),
    ({"fitnet": 100, "kd": 1}, -1, 3, "hint_epochs must be a whole number >= 0"),
    ({"fitnet": 100, "kd": 1}, 3, 3, r"hint_epochs \(3\) must be below epochs \(3\)"),
])
def test_bad_hint_epochs_are_refused_before_any_work(method, hint_epochs, epochs, message, tmp_path):
    with pytest.raises(KdqError, match=message) as err:
        kdq.distill("cnn-tiny", tmp_path / "no-teacher", "digits", method=method, hint_epochs=hint_epochs,
                    epochs=epochs, out=tmp_path / "s")
    assert "\n" not in str(err.value) and not (tmp_path / "s").exists()


def test_hint_epochs_from_the_cli(tmp_path):
    data = ["--data", "digits", "--batch-size", "64", "--no-progress", "--subset", "300"]
    assert main(["train", "--model", "cnn-small", *data, "--epochs", "1", "--out", str(tmp_path / "t")]) == 0
    assert main(["distill", "--model", "cnn-tiny", "--teacher", str(tmp_path / "t"), *data, "--epochs", "2",
                 "--method", "fitnet", "--method", "kd", "--hint-epochs", "1", "--out", str(tmp_path / "s")]) == 0
    first, second = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert "train_hint" in first and "train_kd" not in first and "train_ce" not in first
    assert "train_kd" in second and "train_ce" in second and "train_hint" not in second
    assert read_config(tmp_path / "s")["distill"]["hint_epochs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("hint_epochs", [0, 1])
def test_resume_with_adapters_is_bit_exact(digits, tmp_path, hint_epochs):
    """An interrupted run with trainable adapters resumes to the same student and adapters,
    across the hint stage's end too (the interruption falls in the second epoch)."""
    cfg = TrainConfig(epochs=2, batch_size=64, progress=False, device="cpu")
    steps = len(digits.train) // cfg.batch_size

    def run(out, after, resume=False):  # noqa: ANN001, ANN202
        torch.manual_seed(0 if not resume else 123)  # a resumed process starts from other weights
        student, teacher = create_model("cnn-tiny", 10, 1), create_model("cnn-small", 10, 1)
        torch.manual_seed(7)
        teacher.load_state_dict(create_model("cnn-small", 10, 1).state_dict())
        objective = Interrupt(Distiller(teacher, method_losses({"fitnet": 100, "kd": 1}), hint_epochs=hint_epochs),
                              after)
        fit(student, digits, cfg, out, objective=objective, resume=resume)
        return student, objective

    (straight, straight_parts), (resumed, resumed_parts) = straight_and_resumed(run, tmp_path, steps + 2)
    assert_same_state((straight, resumed), (straight_parts, resumed_parts))
    assert any("adapter" in k or "losses.fitnet" in k for k in straight_parts.state_dict())


def test_kdq_methods_lists_every_method_with_its_family(capsys):
    from kdq.distill import LOSSES

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        assert f"| {name} " in out and cls.family in out and cls.paper.split(",")[0] in out


def test_yaml_stages_take_a_method_and_refuse_a_bad_one():
    from kdq.config import parse_experiment

    def stages(kd: dict) -> dict:
        return {"data": {"name": "digits"}, "stages": {"t": {"model": "cnn-small"}, "s": kd}}

    exp = parse_experiment(stages({"model": "cnn-tiny", "teacher": "t", "method": {"kd": 1, "at": 1000},
                                   "features": ["stage3=stage3"]}))
    assert exp.stages[1].options["method"] == {"kd": 1, "at": 1000}
    for body, message in (({"method": "kdd"}, "did you mean kd"),
                          ({"method": {"at": -2}}, "weight must be a finite number >= 0"),
                          ({"method": "at", "teacher_mode": "cached"}, "cached teacher does not keep"),
                          ({"features": ["stage3"]}, "STUDENT_LAYER=TEACHER_LAYER")):
        with pytest.raises(KdqError, match=message):
            parse_experiment(stages({"model": "cnn-tiny", "teacher": "t", **body}))


@pytest.mark.parametrize("method, message", [
    ("rkd", "the student (Sequential) has no final nn.Linear named fc"),
    ("at", "the student (Sequential) names no feature layers (feature_layers())"),
])
def test_a_module_without_what_the_method_reads_is_refused_at_setup(method, message, digits):
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    objective = Distiller(create_model("cnn-small", 10, 1), method_losses(method), "online")
    with pytest.raises(KdqError, match=re.escape(message)) as err:
        objective.prepare(student, digits.train, torch.device("cpu"))
    assert "\n" not in str(err.value)
