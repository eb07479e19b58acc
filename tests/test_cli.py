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
    ("data: {name: digits}\nstages: {a: {model: cnn-tiny, teacher: b, alpha: 2}}\n", "neither an earlier stage"),
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
    ("{kind: quantize, source: nope}", "source must name an earlier train or distill stage"),
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
