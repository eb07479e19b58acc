"""`kdq deploy` and YAML `kind: deploy`: the pipeline's last step, ONNX Runtime's figures in a run directory."""

from __future__ import annotations

import json

import pytest

from kdq.cli import main

QUIET = ["--batch-size", "64", "--no-progress"]


def test_a_pipeline_ends_in_onnx_runtime(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("""
name: p
data: {name: digits, subset: 300}
train: {epochs: 1, batch_size: 64, progress: false}
stages:
  base: {model: cnn-tiny}
  int8: {kind: quantize, source: base}
  onnx: {kind: deploy, source: int8}
  onnx-float: {kind: deploy, source: base}
""")
    assert main(["run", str(path), "--out", str(tmp_path / "exp")]) == 0
    table = capsys.readouterr().out
    assert "onnxruntime" in table
    onnx = json.loads((tmp_path / "exp" / "onnx" / "results.json").read_text())
    int8 = json.loads((tmp_path / "exp" / "int8" / "results.json").read_text())
    assert onnx["runtime"] == "onnxruntime" and onnx["precision"] == "int8"
    assert onnx["macs"] == int8["macs"] and abs(onnx["accuracy"] - int8["accuracy"]) < 0.02
    assert (tmp_path / "exp" / "onnx" / "deployed.onnx").stat().st_size == onnx["size_bytes"]
    # run again: every stage is reused, nothing is redone
    assert main(["run", str(path), "--out", str(tmp_path / "exp")]) == 0
    assert "reusing finished stage onnx" in capsys.readouterr().err


@pytest.mark.parametrize("yaml_stage, message", [
    ("{kind: deploy, source: nope}", "source must name an earlier stage that writes a float or int8 model"),
    ("{kind: deploy, source: base, int8: maybe}", "int8"),
])
def test_bad_deploy_stages_are_refused_before_any_work(tmp_path, capsys, yaml_stage, message):
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\ndata: {{name: digits}}\nstages:\n  base: {{model: cnn-tiny}}\n  d: {yaml_stage}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "exp").exists()


def test_deploying_a_folder_without_a_run_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["deploy", str(tmp_path / "empty"), "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "d").exists()
