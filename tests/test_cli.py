"""The `kdq` command line end to end on the bundled digits data, and every bad-input case."""

from __future__ import annotations

import json

import pytest
import yaml

from kdq.cli import main

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--subset", "400"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    assert main(["train", "--data", "digits", "--model", "cnn-tiny", "--out", str(out), *FAST]) == 0
    return out


def test_train_writes_a_complete_run_directory(teacher_dir):
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "model.json", "results.json",
                 "confusion_matrix.png", "training_curves.png"):
        assert (teacher_dir / name).exists(), name
    results = json.loads((teacher_dir / "results.json").read_text())
    for key in ("accuracy", "top5", "per_class_accuracy", "confusion_matrix", "params", "size_bytes",
                "latency_ms_batch1", "throughput_per_s", "environment"):
        assert key in results, key
    assert 0 <= results["accuracy"] <= 1
    assert len(results["confusion_matrix"]) == 10
    assert results["size_bytes"] == (teacher_dir / "model.safetensors").stat().st_size


def test_distill_and_evaluate(teacher_dir, tmp_path, capsys):
    out = tmp_path / "kd"
    code, stdout, _ = run(capsys, "distill", "--teacher", str(teacher_dir), "--data", "digits", "--model", "cnn-tiny",
                          "--temperature", "3", "--alpha", "0.5", "--teacher-mode", "cached", "--out", str(out), *FAST)
    assert code == 0 and "accuracy" in json.loads(stdout)
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_kd", "train_ce", "train_loss"} <= metrics.keys()
    code, stdout, _ = run(capsys, "evaluate", str(out), "--no-speed")
    assert code == 0 and json.loads(stdout)["accuracy"] == pytest.approx(
        json.loads((out / "results.json").read_text())["accuracy"])


def test_listing_commands(capsys):
    code, out, _ = run(capsys, "models", "resnet*")
    assert code == 0 and "resnet20" in out and "cnn-small" not in out
    code, out, _ = run(capsys, "datasets")
    assert code == 0 and "fashion-mnist" in out and "digits" in out


def test_run_experiment_prints_table(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "name: tiny\n"
        "data: {name: digits, subset: 300}\n"
        "train: {batch_size: 64, progress: false, epochs: 1}\n"
        "stages:\n"
        "  teacher: {model: cnn-small}\n"
        "  baseline: {model: cnn-tiny}\n"
        "  kd: {kind: distill, model: cnn-tiny, teacher: teacher, temperature: 4, alpha: 0.7}\n"
        "compare: {teacher: teacher, baseline: baseline, student: kd}\n"
    )
    code, out, err = run(capsys, "run", str(exp), "--out", str(tmp_path / "o"), "--set", "teacher.epochs=2")
    assert code == 0, err
    assert "KD gain:" in out and "| kd " in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["stages"]["teacher"]["epochs_run"] == 2
    # a second run reuses every finished stage instead of retraining
    code, out, err = run(capsys, "run", str(exp), "--out", str(tmp_path / "o"), "--set", "teacher.epochs=2")
    assert code == 0 and err.count("reusing finished stage") == 3


BAD = [
    (["train", "--data", "fashion-mnst", "--model", "cnn-tiny", "--out", "x"], "did you mean fashion-mnist"),
    (["train", "--data", "digits", "--model", "resnet21", "--out", "x"], "resnet20"),
    (["train", "--data", "digits", "--model", "cnn-tiny", "--out", "x", "--epochs", "0"], "epochs must be >= 1"),
    (["train", "--data", "synthetic", "--model", "resnet20", "--out", "x"], "tabular"),
    (["train", "--data", "digits", "--model", "cnn-tiny", "--out", "x", "--model-arg", "colour=3"], "does not take"),
    (["distill", "--teacher", "nowhere", "--data", "digits", "--model", "cnn-tiny", "--out", "x"], "not found"),
    (["evaluate", "nowhere"], "not found"),
]


@pytest.mark.parametrize("argv, words", BAD)
def test_bad_input_is_one_line_exit_2(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("kdq: error:") and err.count("\n") == 1 and words in err, err


@pytest.mark.parametrize("flag, value, words", [
    ("--temperature", "0", "temperature must be > 0"),
    ("--alpha", "1.5", "alpha must be in [0, 1]"),
])
def test_bad_distill_hyperparameters(teacher_dir, tmp_path, capsys, flag, value, words):
    code, _, err = run(capsys, "distill", "--teacher", str(teacher_dir), "--data", "digits", "--model", "cnn-tiny",
                       "--out", str(tmp_path / "kd"), flag, value, *FAST)
    assert code == 2 and words in err and err.count("\n") == 1


def test_teacher_with_other_classes(teacher_dir, tmp_path, capsys):
    code, _, err = run(capsys, "distill", "--teacher", str(teacher_dir), "--data", "synthetic", "--model", "mlp-small",
                       "--out", str(tmp_path / "kd"), *FAST)
    assert code == 2 and "train a teacher on synthetic" in err


@pytest.mark.parametrize("text, words", [
    ("data: {name: digits\nstages: [", "not valid YAML at line"),
    ("data: {name: digits}\nstages: {a: {model: cnn-tiny, epochz: 1}}\n", "unknown key 'epochz' in stage 'a' (did you mean epochs"),
    ("data: {name: digits}\nstages: {a: {model: cnn-tiny, epochs: 0}}\n", "stage 'a': epochs must be >= 1"),
    ("data: {name: digits}\nstages: {a: {model: cnn-tiny, teacher: b}}\n", "neither an earlier stage"),
    ("data: {name: digits}\nstages: {b: {model: cnn-tiny}, a: {model: cnn-tiny, teacher: b, alpha: 2}}\n", "alpha must be in [0, 1]"),
    ("data: {name: digits}\nstages: {b: {model: cnn-tiny}, a: {model: cnn-tiny, teacher: b, temperature: -1}}\n", "temperature must be > 0"),
    ("dta: {name: digits}\n", "unknown key 'dta' in the experiment (did you mean data"),
    ("data: {name: digits}\nstages: {a: {model: cnn-tiny}}\ncompare: {student: z}\n", "does not exist"),
])
def test_bad_experiment_files(text, words, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = run(capsys, "run", str(path))
    assert code == 2 and words in err and err.count("\n") == 1, err


def test_bad_override(tmp_path, capsys):
    path = tmp_path / "e.yaml"
    path.write_text("data: {name: digits}\nstages: {teacher: {model: cnn-tiny}}\n")
    code, _, err = run(capsys, "run", str(path), "--set", "teachr.epochs=2")
    assert code == 2 and "did you mean teacher" in err
    code, _, err = run(capsys, "run", str(path), "--set", "teacher.epochs")
    assert code == 2 and "KEY=VALUE" in err


def test_missing_files_say_where_kdq_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KDQ_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("kdq.data.locate.SYSTEM_DIRS", {})
    code, _, err = run(capsys, "train", "--data", "mnist", "--model", "cnn-tiny", "--out", str(tmp_path / "x"),
                       "--no-download")
    assert code == 2 and err.count("\n") == 1 and str(tmp_path / "empty") in err, err


@pytest.mark.slow
def test_quickstart_example_runs_on_fashion_mnist(tmp_path, capsys):
    """The shipped example, shrunk: the file parses, every stage runs, the table prints."""
    from pathlib import Path

    from kdq.data.locate import SYSTEM_DIRS

    if not any(d.is_dir() for d in SYSTEM_DIRS["fashion-mnist"]):
        pytest.skip("Fashion-MNIST is not installed (make data installs it)")
    example = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
    code, out, err = run(capsys, "run", str(example), "--out", str(tmp_path), "--set", "data.subset=600",
                         "--set", "train.progress=false",
                         "--set", "teacher.epochs=1", "--set", "baseline.epochs=1", "--set", "kd.epochs=1")
    assert code == 0, err
    assert "KD gain" in out and "student vs teacher" in out


def test_export_onnx_float_and_int8_then_evaluate(teacher_dir, tmp_path, capsys):
    code, out, err = run(capsys, "export", str(teacher_dir), "--out", str(tmp_path / "m.onnx"))
    assert code == 0, err
    assert json.loads(out)["float_agreement"] >= 0.999
    code, out, err = run(capsys, "export", str(teacher_dir), "--int8", "--calibration-batches", "1000",
                         "--out", str(tmp_path / "m.int8.onnx"))
    assert code == 0, err
    info = json.loads(out)
    assert "exceed" in err  # the calibration count is clamped, with a warning
    assert info["int8_size_bytes"] < info["float_size_bytes"]
    code, out, err = run(capsys, "evaluate", str(tmp_path / "m.int8.onnx"), "--no-speed")
    assert code == 0, err
    results = json.loads(out)
    assert results["runtime"] == "onnxruntime"
    assert results["accuracy"] == pytest.approx(info["int8_accuracy"])
    assert (tmp_path / "m.int8.results.json").exists()


def test_evaluate_rejects_foreign_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    code, _, err = run(capsys, "evaluate", str(bad))
    assert code == 2 and "not a valid ONNX file" in err and err.count("\n") == 1


def test_quantize_static_dynamic_and_qat_with_teacher(teacher_dir, tmp_path, capsys):
    float_acc = json.loads((teacher_dir / "results.json").read_text())["accuracy"]
    code, out, err = run(capsys, "quantize", str(teacher_dir), "--out", str(tmp_path / "q"),
                         "--calibration-batches", "2", "--observer", "minmax")
    assert code == 0, err
    static = json.loads(out)
    assert static["runtime"] == "pytorch-int8" and static["accuracy"] > float_acc - 0.1
    assert static["size_bytes"] < json.loads((teacher_dir / "results.json").read_text())["size_bytes"]
    code, out, err = run(capsys, "evaluate", str(tmp_path / "q"), "--no-speed")  # reloads without pickle
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(static["accuracy"])

    code, out, err = run(capsys, "quantize", str(teacher_dir), "--method", "dynamic", "--out", str(tmp_path / "d"))
    assert code == 0, err

    code, out, err = run(capsys, "qat", str(teacher_dir), "--teacher", str(teacher_dir), "--out", str(tmp_path / "qat"),
                         "--epochs", "1", "--no-progress", "--freeze-bn-epoch", "1", "--batch-size", "64")
    assert code == 0, err
    assert json.loads(out)["runtime"] == "pytorch-int8"
    assert {"train_kd", "train_ce"} <= json.loads((tmp_path / "qat" / "metrics.jsonl").read_text().splitlines()[0]).keys()

    # fake quantization breaks under CUDA fp16 autocast, so QAT always records and runs fp32
    assert yaml.safe_load((tmp_path / "qat" / "config.yaml").read_text())["train"]["amp"] is False

    # the QAT model goes to ONNX with its own scales; ONNX Runtime runs it as int8
    qat_acc = json.loads((tmp_path / "qat" / "results.json").read_text())["accuracy"]
    code, out, err = run(capsys, "export", str(tmp_path / "qat"), "--format", "onnx", "--int8",
                         "--out", str(tmp_path / "qat" / "model.onnx"))
    assert code == 0, err
    info = json.loads(out)
    assert info["pytorch_int8_accuracy"] == pytest.approx(qat_acc)
    assert info["int8_agreement"] >= 0.95 and abs(info["int8_accuracy"] - qat_acc) <= 0.03
    code, out, err = run(capsys, "evaluate", str(tmp_path / "qat" / "model.onnx"), "--no-speed")
    assert code == 0, err
    results = json.loads(out)
    assert results["precision"] == "int8" and results["accuracy"] == pytest.approx(info["int8_accuracy"])


def test_quantize_bad_skip_is_one_line(teacher_dir, tmp_path, capsys):
    code, _, err = run(capsys, "quantize", str(teacher_dir), "--out", str(tmp_path / "q"), "--skip", "no.such.layer",
                       "--calibration-batches", "1")
    assert code == 2 and err.count("\n") == 1 and "no.such.layer" in err, err


def test_run_experiment_with_int8_stages(tmp_path, capsys):
    exp = tmp_path / "q.yaml"
    exp.write_text(
        "data: {name: digits, subset: 300}\n"
        "train: {batch_size: 64, progress: false, epochs: 1}\n"
        "stages:\n"
        "  teacher: {model: cnn-small}\n"
        "  kd: {kind: distill, model: cnn-tiny, teacher: teacher}\n"
        "  kd-int8: {kind: quantize, source: kd, calibration_batches: 2}\n"
        "  kd-qat: {kind: qat, source: kd, teacher: teacher, epochs: 1, freeze_bn_epoch: 1}\n"
        "compare: {teacher: teacher, student: kd}\n"
    )
    code, out, err = run(capsys, "run", str(exp), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "| kd-int8 | cnn-tiny int8 | pytorch-int8 cpu" in out and "| kd-qat  | cnn-tiny int8 | pytorch-int8 cpu" in out
    stages = json.loads((tmp_path / "o" / "summary.json").read_text())["stages"]
    assert stages["kd-int8"]["size_bytes"] < stages["kd"]["size_bytes"]

    # every stage records the data options, so later commands reload the very same data
    for stage in ("kd", "kd-int8", "kd-qat"):
        assert yaml.safe_load((tmp_path / "o" / stage / "config.yaml").read_text())["data"]["subset"] == 300, stage
    code, out, err = run(capsys, "evaluate", str(tmp_path / "o" / "kd-int8"), "--no-speed")
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(stages["kd-int8"]["accuracy"])


def test_run_experiment_with_lowbit_stage(tmp_path, capsys):
    exp = tmp_path / "lb.yaml"
    exp.write_text(
        "data: {name: digits, subset: 300}\n"
        "train: {batch_size: 64, progress: false, epochs: 1}\n"
        "stages:\n"
        "  teacher: {model: cnn-small}\n"
        "  w2a2: {kind: qat, source: teacher, teacher: teacher, bits: w2a2, quantizer: lsq, epochs: 1}\n"
        "  w1: {kind: qat, source: teacher, bits: w1, quantizer: binary, epochs: 1}\n"
    )
    code, out, err = run(capsys, "run", str(exp), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "| w2a2    | cnn-small w2a2 | pytorch-fakequant cpu" in out and "| w1      | cnn-small w1" in out
    stages = json.loads((tmp_path / "o" / "summary.json").read_text())["stages"]
    assert stages["w1"]["size_bytes"] < stages["w2a2"]["size_bytes"] < stages["teacher"]["size_bytes"]
    code, out, err = run(capsys, "run", str(exp), "--out", str(tmp_path / "o"))  # finished stages are reused
    assert code == 0 and "reusing finished stage w2a2" in err


@pytest.mark.slow
def test_run_experiment_with_recipe_stages_writes_the_sweep_report(tmp_path, capsys):
    exp = tmp_path / "sweep.yaml"
    exp.write_text(
        "data: {name: digits, subset: 300}\n"
        "train: {batch_size: 64, progress: false, epochs: 1}\n"
        "stages:\n"
        "  float: {model: cnn-small}\n"
        "  alone: {kind: recipe, recipe: individual, source: float, bits: [w8a8, w2a2], seeds: [0, 1]}\n"
        "  chain: {kind: recipe, recipe: takd-chain, source: float, bits: [w8a8, w2a2], seeds: [0, 1]}\n"
        "  speq: {kind: recipe, recipe: speq, source: float, bits: w2a2, teacher_bits: [2, 8]}\n"
    )
    code, out, err = run(capsys, "run", str(exp), "--out", str(tmp_path / "o"))
    assert code == 0, err
    root = tmp_path / "o"
    assert "| chain/w2a2 seed1 | cnn-small w2a2 | pytorch-fakequant cpu" in out and "| speq/w2a2 " in out
    report = (root / "sweep.md").read_text()
    assert "| chain  | w2a2 | 2 " in report and "±" in report and "k/32" in report
    assert (root / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "chain" / "seed1" / "w2a2" / "packed.safetensors").exists()
    assert yaml.safe_load((root / "chain" / "seed0" / "w2a2" / "config.yaml").read_text())["teacher"] == str(root / "chain" / "seed0" / "w8a8")
    before = (root / "alone" / "seed1" / "w2a2" / "results.json").stat().st_mtime_ns
    code, out, err = run(capsys, "run", str(exp), "--out", str(root))  # unchanged stages keep their runs
    assert code == 0 and (root / "alone" / "seed1" / "w2a2" / "results.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("stage, words", [
    ("{kind: recipe, source: a, bits: w4a4}", "needs a recipe"),
    ("{kind: recipe, recipe: chain, source: a, bits: w4a4}", "did you mean takd-chain"),
    ("{kind: recipe, recipe: individual, source: a, bits: w4a4, temperature: 2}", "does not take 'temperature'"),
    ("{kind: recipe, recipe: qkd, source: a, bits: w4a4, phases: {tutor: {}}}", "did you mean tutoring"),
    ("{kind: recipe, recipe: speq, source: a, bits: w4}", "activation bits"),
    ("{kind: recipe, recipe: apprentice, source: a, bits: [w4a4, w33a4]}", "bits"),
    ("{kind: recipe, recipe: apprentice, source: a, bits: w4a4, seeds: 2}", "seeds must be a list"),
    ("{kind: recipe, recipe: apprentice, source: a, bits: w4a4, method: static}", "does not apply to a recipe stage"),
    ("{kind: qat, source: a, bits: w4a4, seeds: [0]}", "belongs to recipe stages"),
    ("{kind: quantize, source: nope}", "source must name an earlier stage that writes a float model"),
    ("{kind: quantize, source: a, method: fast}", "method must be one of static, dynamic"),
    ("{kind: quantize, source: a, freeze_bn_epoch: 1}", "does not apply to a quantize stage"),
    ("{kind: qat, source: a, bits: w0a4}", "bits"),
    ("{kind: qat, source: a, bits: w4a4, quantizer: lsqq}", "did you mean"),
    ("{kind: qat, source: a, quantizer: lsq}", "needs bits"),
    ("{kind: qat, source: a, bits: w4a4, backend: x86}", "int8 QAT option"),
])
def test_bad_int8_stages(stage, words, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(f"data: {{name: digits}}\nstages: {{a: {{model: cnn-tiny}}, b: {stage}}}\n")
    code, _, err = run(capsys, "run", str(path))
    assert code == 2 and words in err and err.count("\n") == 1, err


def test_seed004_example_parses():
    from pathlib import Path

    from kdq.config import load_experiment

    exp = load_experiment(Path(__file__).resolve().parents[1] / "examples" / "seed004.yaml")
    assert [s.kind for s in exp.stages] == ["train", "train", "distill", "quantize", "qat"]


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_zero_calibration_batches_is_one_line(command, teacher_dir, tmp_path, capsys):
    extra = ["--int8"] if command == "export" else []
    code, _, err = run(capsys, command, str(teacher_dir), "--out", str(tmp_path / "o.onnx"), *extra,
                       "--calibration-batches", "0")
    assert code == 2 and "calibration batches must be >= 1" in err and err.count("\n") == 1, err


def test_lowbit_qat_with_teacher_then_evaluate(teacher_dir, tmp_path, capsys):
    out_dir = tmp_path / "w4a4"
    code, out, err = run(capsys, "qat", str(teacher_dir), "--bits", "w4a4", "--quantizer", "lsq", "--teacher", str(teacher_dir),
                         "--out", str(out_dir), "--epochs", "1", "--no-progress", "--batch-size", "64")
    assert code == 0, err
    results = json.loads(out)
    assert results["runtime"] == "pytorch-fakequant" and results["bits"] == "w4a4"
    float_results = json.loads((teacher_dir / "results.json").read_text())
    assert results["size_bytes"] < float_results["size_bytes"] / 2  # packed 4-bit weights, 8-bit first/last
    # the fixture's float model saw 400 images once, so its accuracy says little; that low-bit
    # training learns is tested in tests/quant/lowbit on a task it can solve
    assert 0 <= results["accuracy"] <= 1
    assert len(json.loads((out_dir / "results.json").read_text())["per_class_accuracy"]) == 10
    code, out, err = run(capsys, "evaluate", str(out_dir), "--no-speed")  # reloads the packed file
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(results["accuracy"])

    # one self-contained file, the manifest in its header; it rebuilds the same model
    import torch

    from kdq.quant.lowbit import load_packed

    single = out_dir / "model.kdq.safetensors"
    code, out, err = run(capsys, "export", str(out_dir), "--format", "packed", "--out", str(single))
    assert code == 0, err
    assert json.loads(out)["size_bytes"] < (out_dir / "packed.safetensors").stat().st_size + 8192
    x = torch.randn(4, 1, 8, 8)  # digits images
    assert torch.equal(load_packed(single)(x), load_packed(out_dir)(x))
    from kdq.errors import KdqError

    with pytest.raises(KdqError, match="not a packed low-bit kdq model"):
        load_packed(teacher_dir / "model.safetensors")  # safetensors, but a float run's
    code, _, err = run(capsys, "export", str(out_dir), "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "--format packed" in err
    code, _, err = run(capsys, "export", str(teacher_dir), "--format", "packed", "--out", str(tmp_path / "m.safetensors"))
    assert code == 2 and "kdq qat --bits" in err


@pytest.mark.slow
def test_recipe_command_runs_seeds_and_writes_the_report(teacher_dir, tmp_path, capsys):
    out_dir = tmp_path / "chain"
    args = ["recipe", "takd-chain", str(teacher_dir), "--bits", "w8a8,w2a2", "--seeds", "0,1", "--out", str(out_dir),
            "--epochs", "1", "--batch-size", "64", "--no-progress"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "| takd-chain | w2a2 | 2     |" in out and "±" in out
    assert (out_dir / "sweep.png").exists() and (out_dir / "sweep.md").read_text() == out
    assert yaml.safe_load((out_dir / "seed1" / "w2a2" / "config.yaml").read_text())["teacher"] == str(out_dir / "seed1" / "w8a8")
    before = (out_dir / "seed0" / "w2a2" / "results.json").stat().st_mtime_ns
    assert run(capsys, *args, "--resume")[0] == 0  # finished schemes are kept
    assert (out_dir / "seed0" / "w2a2" / "results.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("extra, words", [
    (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
    (["--teacher-bits", "4,8"], "does not take 'teacher_bits'"),
    (["--bits", "w4a4,w4a4"], "twice"),
])
def test_recipe_command_bad_input_is_one_line(teacher_dir, tmp_path, capsys, extra, words):
    argv = ["recipe", "apprentice", str(teacher_dir), "--out", str(tmp_path / "r"), "--bits", "w4a4", *extra]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and words in err, err


@pytest.mark.parametrize("extra, words", [
    (["--bits", "w0a4"], "bits"),
    (["--bits", "w4a4", "--quantizer", "lsqq"], "did you mean"),
    (["--bits", "four"], "w<bits>a<bits>"),
])
def test_lowbit_qat_bad_input_is_one_line(teacher_dir, tmp_path, capsys, extra, words):
    code, _, err = run(capsys, "qat", str(teacher_dir), "--out", str(tmp_path / "q"), "--epochs", "1", *extra)
    assert code == 2 and err.count("\n") == 1 and words in err, err


USER_MODELS = '''
from torch import nn
from kdq.models import register_model


class Rows(nn.Module):
    """A user's LSTM: the digits' rows as steps."""

    def __init__(self, num_classes=10, in_channels=64, *, hidden=16):
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.lstm(x.flatten(1).reshape(len(x), -1, 8))[0][:, -1])


@register_model("kdq-test-rows", input_kind="vector")
def rows(**kwargs) -> Rows:
    return Rows(**kwargs)
'''


@pytest.mark.slow
def test_user_model_through_import(tmp_path, capsys, monkeypatch):
    """A run of a user's registered model is evaluated, quantized and taught through `kdq --import`."""
    import subprocess
    import sys

    import kdq
    from kdq.models.registry import MODELS

    (tmp_path / "kdq_test_user_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    try:
        import kdq_test_user_models  # noqa: F401  registers kdq-test-rows, as the user's own code would

        kdq.train("kdq-test-rows", "digits", out=tmp_path / "f", data_options={"subset": 300}, epochs=1, progress=False)
        code, out, err = run(capsys, "--import", "kdq_test_user_models", "quantize", str(tmp_path / "f"),
                             "--method", "dynamic", "--out", str(tmp_path / "q"))
        assert code == 0, err
        assert json.loads((tmp_path / "q" / "quantized.json").read_text())["rnn"]  # the LSTM is int8
    finally:
        MODELS._items.pop("kdq-test-rows", None)  # other tests list every registered model
        sys.modules.pop("kdq_test_user_models", None)

    def kdq_cli(*argv):  # a fresh process: only --import can register the model there
        return subprocess.run([sys.executable, "-m", "kdq.cli", *argv], capture_output=True, text=True, timeout=300)

    done = kdq_cli("--import", "kdq_test_user_models", "evaluate", str(tmp_path / "f"), "--no-speed")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["accuracy"] == pytest.approx(json.loads((tmp_path / "f" / "results.json").read_text())["accuracy"])
    refused = kdq_cli("evaluate", str(tmp_path / "q"), "--no-speed")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("kdq: error: ")
    assert "'kdq-test-rows'" in refused.stderr and "kdq --import MODULE" in refused.stderr

    # in this process the model is unregistered again: a teacher run, refused the same way
    files = sorted(p.name for p in (tmp_path / "f").iterdir())
    code, _, err = run(capsys, "distill", "--model", "mlp-small", "--teacher", str(tmp_path / "f"), "--data", "digits",
                       "--out", str(tmp_path / "s"), *FAST)
    assert code == 2 and err.count("\n") == 1 and "kdq --import MODULE" in err
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == files
    code, _, err = run(capsys, "--import", "no_such_kdq_module", "models")
    assert code == 2 and err.count("\n") == 1 and "--import no_such_kdq_module: No module named" in err


def test_custom_module_run_refused_in_one_line(tmp_path, capsys):
    from torch import nn

    import kdq

    kdq.train(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), "digits", out=tmp_path / "m",
              data_options={"subset": 300}, epochs=1, progress=False)
    capsys.readouterr()
    for argv in (["evaluate", str(tmp_path / "m")], ["quantize", str(tmp_path / "m"), "--out", str(tmp_path / "q")],
                 ["export", str(tmp_path / "m"), "--out", str(tmp_path / "m.onnx")]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1, argv
        assert "custom model (class 'torch.nn.modules.container.Sequential')" in err and "kdq --import MODULE" in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "m.onnx").exists()


def _refused(capsys, *argv) -> str:
    """Run kdq; assert exit 2 and exactly one 'kdq: error:' line on stderr (argparse's own errors too)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and err.startswith("kdq: error: "), err
    return err


TRAIN_ARGS = ["train", "--data", "digits", "--model", "cnn-tiny", *FAST]


@pytest.mark.parametrize("extra, words", [
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--momentum=-inf"], "momentum must be a finite number"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number"),
    (["--warmup-epochs", "nan"], "warmup_epochs must be a finite number"),
    (["--mixup", "inf"], "mixup must be a finite number"),
    (["--cutmix", "nan"], "cutmix must be a finite number"),
    (["--label-smoothing", "nan"], "label_smoothing must be a finite number"),
    (["--eval-batch-size", "0"], "eval_batch_size must be >= 1, got 0"),
    (["--val-size", "0"], "--val-size must be a count >= 1 or a fraction in (0, 1), got 0"),
    (["--val-size=-3"], "--val-size must be a count >= 1"),
    (["--val-size", "inf"], "--val-size must be a count >= 1 or a fraction in (0, 1), got inf"),
    (["--val-size", "nan"], "--val-size must be a count >= 1"),
    (["--seed", "1e23"], "argument --seed: invalid int value: '1e23'"),
    (["--seed", "-1"], "seed must be an integer from 0 to 4294967295, got -1"),
    (["--seed", str(2**32)], "seed must be an integer from 0 to 4294967295"),
    (["--split-seed=-1"], "the split seed (--split-seed) must be an integer from 0 to 2**63 - 1, got -1"),
    (["--split-seed", str(10**23)], "the split seed (--split-seed) must be an integer from 0 to 2**63 - 1"),
    (["--device", "meta"], "unknown device 'meta'; use auto, cpu, cuda, cuda:N or mps"),
    (["--device", "foo"], "unknown device 'foo'"),
    (["--device", "cuda:7"], "'cuda:7' requested but"),
])
def test_train_refuses_bad_numbers_before_writing(tmp_path, capsys, monkeypatch, extra, words):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if torch.cuda.is_available() else 0)
    err = _refused(capsys, *TRAIN_ARGS, "--out", str(tmp_path / "out"), *extra)
    assert words in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, words", [
    (["--temperature", "inf"], "temperature must be > 0 and finite, got inf"),
    (["--temperature", "nan"], "temperature must be > 0 and finite, got nan"),
    (["--alpha", "nan"], "alpha must be in [0, 1], got nan"),
])
def test_distill_refuses_infinite_temperature_and_alpha(teacher_dir, tmp_path, capsys, extra, words):
    err = _refused(capsys, "distill", "--teacher", str(teacher_dir), "--data", "digits", "--model", "cnn-tiny",
                   "--out", str(tmp_path / "out"), *FAST, *extra)
    assert words in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, words", [
    (["quantize", "{run}", "--out", "{out}", "--calibration-batch-size", "-5"], "calibration batch size must be >= 1, got -5"),
    (["quantize", "{run}", "--out", "{out}", "--calibration-batches", "-5"], "calibration batches must be >= 1, got -5"),
    (["export", "{run}", "--int8", "--out", "{out}/m.onnx", "--calibration-batch-size", "0"], "calibration batch size must be >= 1"),
    (["qat", "{run}", "--out", "{out}", "--lr", "inf"], "lr must be a finite number, got inf"),
    (["qat", "{run}", "--out", "{out}", "--bits", "w4a4", "--seed=-2"], "seed must be an integer from 0"),
    (["recipe", "individual", "{run}", "--bits", "w4a4", "--out", "{out}", "--seeds", "0,0"], "seeds lists a seed twice"),
    (["recipe", "apprentice", "{run}", "--bits", "w4a4", "--out", "{out}", "--temperature", "inf"],
     "temperature must be > 0 and finite, got inf"),
    (["recipe", "speq", "{run}", "--bits", "w4a4", "--out", "{out}", "--cosine-weight", "nan"],
     "cosine_weight must be a finite number >= 0, got nan"),
])
def test_quantizing_commands_refuse_bad_numbers_before_writing(teacher_dir, tmp_path, capsys, argv, words):
    files = sorted(p.name for p in teacher_dir.iterdir())
    out = tmp_path / "out"
    err = _refused(capsys, *[a.format(run=teacher_dir, out=out) for a in argv])
    assert words in err
    assert not out.exists() and sorted(p.name for p in teacher_dir.iterdir()) == files


def test_a_diverged_training_is_not_saved_as_a_model(tmp_path, capsys):
    err = _refused(capsys, *TRAIN_ARGS, "--subset", "300", "--lr", "1e12", "--out", str(tmp_path / "out"))
    assert "training diverged: the loss is nan at epoch 1; lower --lr (now 1e+12)" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("command, defaults", [("qat", "QAT_DEFAULTS"), ("recipe", "FINE_TUNE_DEFAULTS")])
def test_help_shows_each_commands_own_training_defaults(capsys, command, defaults):
    from kdq.engine import config

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for key in ("epochs", "lr", "warmup_epochs"):
        value = getattr(config, defaults)[key]
        assert f"--{key.replace('_', '-')} {key.upper()} " in text
        assert f"(default: {value}" in text.split(f"--{key.replace('_', '-')} {key.upper()} ", 1)[1][:120], key
    assert "(default: 10)" not in text and "(default: 0.05)" not in text
