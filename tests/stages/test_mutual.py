"""`kdq mutual` / YAML `kind: mutual`: students trained together, each a normal run directory."""

from __future__ import annotations

import json

import pytest

from kdq.cli import main
from kdq.config import parse_experiment
from kdq.errors import KdqError
from kdq.experiment import run_experiment
from kdq.io import read_json, read_yaml
from kdq.stages.mutual import mutual

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--subset", "300", "--data", "digits"]
TRAIN = {"epochs": 1, "batch_size": 64, "progress": False}


@pytest.mark.slow
def test_a_one_epoch_run_writes_a_run_directory_per_student(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["mutual", "--model", "cnn-tiny", "--model", "cnn-small", *FAST, "--out", str(out)]) == 0
    assert read_json(out / "run.json")["kind"] == "recipe"  # a folder of runs
    assert {"checkpoint.pt", "metrics.jsonl", "config.yaml", "best_objective.safetensors"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics.keys() >= {"train_ce_0", "train_kl_0", "train_ce_1", "train_kl_1"}
    capsys.readouterr()
    for k, name in enumerate(("cnn-tiny", "cnn-small")):
        run = out / f"student{k}"
        assert read_json(run / "run.json") == {"kind": "float", "command": "mutual", "status": "finished"}
        assert read_json(run / "model.json")["architecture"]["name"] == name
        assert read_yaml(run / "config.yaml")["mutual"] == {"student": k, "students": 2, "temperature": 1.0}
        results = read_json(run / "results.json")
        assert results["mutual"]["best_epoch_chosen_by"] == "student0"
        assert main(["evaluate", str(run), "--no-speed"]) == 0
        assert read_json(run / "eval-test.json")["accuracy"] == pytest.approx(results["accuracy"])
    # a second run into the finished folder is refused; --resume continues it without training
    capsys.readouterr()
    assert main(["mutual", "--model", "cnn-tiny", "--model", "cnn-small", *FAST, "--out", str(out)]) == 2
    assert "holds a finished recipe run" in capsys.readouterr().err
    assert main(["mutual", "--model", "cnn-tiny", "--model", "cnn-small", *FAST, "--out", str(out), "--resume"]) == 0
    assert "resuming from epoch 1 of 1" in capsys.readouterr().err


def test_one_student_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["mutual", "--model", "cnn-tiny", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "kdq: error: mutual learning needs two or more students, got 1; give two or more " \
                  "(--model A --model B, or models: [A, B])\n"
    assert not out.exists()
    assert main(["mutual", "--model", "cnn-tiny", "--model", "cnn-smal", *FAST, "--out", str(out)]) == 2
    assert "cnn-small" in capsys.readouterr().err and not out.exists()
    with pytest.raises(KdqError, match="mutual learning needs two or more students"):
        mutual(["cnn-tiny"], "digits", out=out)
    with pytest.raises(KdqError, match="temperature must be > 0"):
        mutual(["cnn-tiny", "cnn-tiny"], "digits", temperature=0.0, out=out)
    with pytest.raises(KdqError, match="a list of 2 mappings"):
        mutual(["cnn-tiny", "cnn-tiny"], "digits", model_kwargs=[{}], out=out)
    assert not out.exists()


def _experiment(stage: dict) -> dict:
    return {"name": "dml", "data": {"name": "digits", "subset": 300}, "train": TRAIN, "stages": {"dml": stage}}


def test_yaml_stages_follow_the_signature_and_refuse_one_student():
    exp = parse_experiment(_experiment({"kind": "mutual", "models": ["cnn-tiny", "cnn-small"], "temperature": 2}))
    assert exp.stages[0].options == {"models": ["cnn-tiny", "cnn-small"], "temperature": 2}
    assert exp.stages[0].train == TRAIN
    for body, message in (({"models": ["cnn-tiny"]}, "stage 'dml': mutual learning needs two or more students"),
                          ({"models": "cnn-tiny"}, "models must be a list of two or more model names"),
                          ({"models": ["cnn-tiny", "cnn-smal"]}, "cnn-small"),
                          ({"models": ["cnn-tiny", "cnn-tiny"], "temperature": 0}, "temperature must be > 0"),
                          ({"models": ["cnn-tiny", "cnn-tiny"], "model": "cnn-tiny"}, "'model' does not apply")):
        with pytest.raises(KdqError, match=message):
            parse_experiment(_experiment({"kind": "mutual", **body}))


@pytest.mark.slow
def test_the_experiment_table_has_a_row_per_student(tmp_path):
    exp = parse_experiment(_experiment({"kind": "mutual", "models": ["cnn-tiny", "cnn-small"]}))
    summary = run_experiment(exp, tmp_path / "exp")
    rows = summary["stages"]
    assert set(rows) == {"dml/student0", "dml/student1"}
    assert (rows["dml/student0"]["arch"], rows["dml/student1"]["arch"]) == ("cnn-tiny", "cnn-small")
    assert any(line.startswith("| dml/student1 ") for line in summary["table"].splitlines())
    again = run_experiment(exp, tmp_path / "exp")  # rerun: resumes the finished stage, trains nothing more
    assert again["stages"]["dml/student1"]["accuracy"] == rows["dml/student1"]["accuracy"]
