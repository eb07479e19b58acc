"""Self-distillation, born-again generations and the teacher-assistant chain over model size:
from Python, the CLI and YAML, with their bad input refused before any training."""

from __future__ import annotations

import pytest

from kdq.cli import main
from kdq.config import parse_experiment
from kdq.errors import KdqError
from kdq.experiment import run_experiment
from kdq.io import read_json
from kdq.rundir import read_results, run_state
from kdq.rundir.load import load_model
from kdq.stages.born_again import born_again
from kdq.stages.takd_size import takd_size

FAST = {"epochs": 1, "batch_size": 64, "progress": False}
CLI_FAST = ["--data", "digits", "--subset", "300", "--epochs", "1", "--batch-size", "64", "--no-progress"]


def _experiment(**stages: dict) -> dict:
    return {"name": "chains", "data": {"name": "digits", "subset": 300}, "train": FAST,
            "stages": {"teacher": {"kind": "train", "model": "cnn-small"}, **stages}}


@pytest.mark.parametrize("stage, message", [
    ({"kind": "born-again", "model": "cnn-tiny", "teacher": "teacher", "generations": 0}, "generations must be an integer >= 1"),
    ({"kind": "born-again", "model": "cnn-tiny", "teacher": "teacher", "generations": True}, "generations must be an integer"),
    ({"kind": "born-again", "model": "cnn-tiny", "teacher": "teacher", "method": "kdd"}, "unknown .*kdd"),
    ({"kind": "born-again", "model": "resnet21", "teacher": "teacher"}, "unknown model 'resnet21'"),
    ({"kind": "takd-size", "models": [], "teacher": "teacher"}, "models must be a list of at least one model name"),
    ({"kind": "takd-size", "models": "cnn-tiny", "teacher": "teacher"}, "models must be a list"),
    ({"kind": "takd-size", "models": ["cnn-small", "resnet21"], "teacher": "teacher"}, "unknown model 'resnet21'"),
    ({"kind": "takd-size", "models": ["cnn-tiny"]}, "names no teacher"),
    ({"kind": "self-distill", "model": "cnn-tiny", "alpha": 1.5}, "alpha must be in"),
    ({"kind": "self-distill", "model": "cnn-tiny", "feature_weight": -1.0}, "feature_weight must be a finite number >= 0"),
    ({"kind": "self-distill", "model": "cnn-tiny", "layers": "stage1"}, "layers must be a non-empty list"),
])
def test_bad_yaml_stages_fail_when_parsed(stage, message):
    with pytest.raises(KdqError, match=message):
        parse_experiment(_experiment(bad=stage))


def test_bad_python_calls_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KdqError, match="generations must be an integer >= 1"):
        born_again("cnn-tiny", tmp_path / "nowhere", "digits", generations=0, out=out, **FAST)
    with pytest.raises(KdqError, match="models must be a list of at least one model name"):
        takd_size([], tmp_path / "nowhere", "digits", out=out, **FAST)
    with pytest.raises(KdqError, match=r"unknown model 'resnet21' \(did you mean"):
        takd_size(["cnn-tiny", "resnet21"], tmp_path / "nowhere", "digits", out=out, **FAST)
    with pytest.raises(KdqError, match="seed"):
        born_again("cnn-tiny", tmp_path / "nowhere", "digits", generations=3, out=out, **{**FAST, "seed": 2**32 - 2})
    assert not out.exists()


def test_bad_cli_input_is_one_line(tmp_path, capsys):
    assert main(["born-again", "--model", "cnn-tiny", "--teacher", str(tmp_path), "--generations", "0",
                 *CLI_FAST, "--out", str(tmp_path / "b")]) == 2
    assert main(["takd-size", "--models", "cnn-tiny,resnet21", "--teacher", str(tmp_path),
                 *CLI_FAST, "--out", str(tmp_path / "t")]) == 2
    assert main(["self-distill", "--model", "cnn-tiny", "--layer", "stage9", *CLI_FAST, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("kdq: error: ") for line in err)
    assert "generations" in err[0] and "resnet21" in err[1] and "stage9" in err[2]
    assert not any((tmp_path / name).exists() for name in "bts")


@pytest.mark.slow
def test_the_three_kinds_in_one_experiment_and_resumed(tmp_path):
    exp = parse_experiment(_experiment(
        self={"kind": "self-distill", "model": "cnn-tiny"},
        born={"kind": "born-again", "model": "cnn-tiny", "teacher": "teacher", "generations": 2, "ensemble": True},
        takd={"kind": "takd-size", "models": ["cnn-small", "cnn-tiny"], "teacher": "teacher"},
    ))
    root = tmp_path / "exp"
    summary = run_experiment(exp, root)
    rows = summary["stages"]
    assert {"self", "born/gen1", "born/gen2", "born/ensemble", "takd/1-cnn-small", "takd/2-cnn-tiny"} <= set(rows)
    assert rows["born/ensemble"]["arch"] == "cnn-tiny x2 mean logits" and rows["takd/2-cnn-tiny"]["arch"] == "cnn-tiny"
    for run in ("self", "born/gen1", "born/gen2", "takd/1-cnn-small", "takd/2-cnn-tiny"):
        assert run_state(root / run).kind == "float"
        load_model(root / run)  # a normal float run: the self-distilled model without its heads
    assert run_state(root / "born").kind == run_state(root / "takd").kind == "recipe"
    assert read_json(root / "born" / "ensemble.json")["generations"] == 2
    assert read_results(root / "born" / "gen2")["accuracy"] == rows["born/gen2"]["accuracy"]
    # each link learns from the one before it
    assert read_json(root / "born" / "gen2" / "run.json")["kind"] == "float"
    assert (root / "born" / "gen2" / "config.yaml").read_text().count(str(root / "born" / "gen1")) == 1
    assert (root / "takd" / "2-cnn-tiny" / "config.yaml").read_text().count(str(root / "takd" / "1-cnn-small")) == 1
    # the same experiment again keeps every finished generation and link
    kept = {p: p.stat().st_mtime_ns for p in (root / "born" / "gen1" / "results.json", root / "takd" / "1-cnn-small" / "results.json")}
    run_experiment(exp, root)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())


@pytest.mark.slow
def test_the_cli_verbs(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert main(["train", "--model", "cnn-small", *CLI_FAST, "--out", str(teacher)]) == 0
    assert main(["born-again", "--model", "cnn-tiny", "--teacher", str(teacher), "--generations", "1",
                 *CLI_FAST, "--out", str(tmp_path / "b")]) == 0
    assert main(["takd-size", "--models", "cnn-tiny", "--teacher", str(teacher), *CLI_FAST, "--out", str(tmp_path / "t")]) == 0
    assert main(["self-distill", "--model", "cnn-tiny", "--layer", "stage2", *CLI_FAST, "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "b" / "gen1" / "model.safetensors").exists() and not (tmp_path / "b" / "gen2").exists()
    # --resume adds generations and keeps the finished one, but only with the options it was started with
    kept = (tmp_path / "b" / "gen1" / "results.json").stat().st_mtime_ns
    base = ["born-again", "--model", "cnn-tiny", "--teacher", str(teacher), *CLI_FAST, "--out", str(tmp_path / "b"), "--resume"]
    capsys.readouterr()
    assert main([*base, "--generations", "2", "--temperature", "2"]) == 2
    assert "was started with distill.temperature 4.0" in capsys.readouterr().err
    assert main([*base, "--generations", "2"]) == 0
    assert (tmp_path / "b" / "gen1" / "results.json").stat().st_mtime_ns == kept
    assert run_state(tmp_path / "b" / "gen2").status == "finished"
    assert (tmp_path / "t" / "1-cnn-tiny" / "model.safetensors").exists()
    assert "layers:\n  - stage2" in (tmp_path / "s" / "config.yaml").read_text()
