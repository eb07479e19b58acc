"""examples/tabular.yaml (issue 13's seed 003): checked as written, and run end to end with 1 epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdq.config import load_experiment
from kdq.distill import method_losses

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tabular.yaml"


def test_example_parses_as_the_seed_describes():
    exp = load_experiment(EXAMPLE)
    assert exp.data == {"name": "synthetic", "samples": 1000, "features": 20, "classes": 3}
    stages = {s.name: s for s in exp.stages}
    assert [s.kind for s in exp.stages] == ["train", "train", "distill"]
    assert (stages["teacher"].model, stages["teacher"].options["model_args"]) == ("mlp", {"hidden": [128, 64]})
    for name in ("baseline", "student"):
        assert (stages[name].model, stages[name].options["model_args"]) == ("mlp-small", {"hidden": [32]})
    kd = stages["student"].options
    (loss, _), = method_losses(kd["method"], temperature=kd["temperature"], alpha=kd["alpha"]).values()
    assert (loss.temperature, loss.alpha, loss.t_squared) == (2.0, 0.5, False)
    assert stages["student"].train["epochs"] == 20 and stages["student"].train["batch_size"] == 32
    assert exp.compare == {"teacher": "teacher", "baseline": "baseline", "student": "student"}


@pytest.mark.slow
def test_example_runs_and_its_models_reload(tmp_path, capsys):
    from kdq.cli import main
    from kdq.rundir.load import load_run

    code = main(["run", str(EXAMPLE), "--out", str(tmp_path), "--set", "train.epochs=1", "--set", "train.progress=false"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "KD gain" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["stages"]) == ["teacher", "baseline", "student"]
    teacher = load_run(tmp_path / "teacher")  # rebuilt from model.json, its data from config.yaml
    assert teacher.model.kdq_spec["kwargs"] == {"hidden": [128, 64]}
    assert [m.out_features for m in teacher.model.body.modules() if hasattr(m, "out_features")] == [128, 64]
    assert teacher.data.num_classes == 3 and teacher.data.input_shape == (20,) and len(teacher.data.test) == 166
    student = load_run(tmp_path / "student")
    assert student.model.kdq_spec["kwargs"] == {"hidden": [32]} and student.model.fc.in_features == 32
