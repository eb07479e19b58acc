"""Several teachers and hidden labels through `kdq distill` / `kdq train`, kdq.distill and YAML."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import yaml

import kdq
from kdq.cli import main
from kdq.config import load_experiment
from kdq.distill.objective import labeled_mask
from kdq.distill.teacher import Ensemble
from kdq.errors import KdqError

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--subset", "300"]
PY_FAST = dict(epochs=1, batch_size=64, progress=False)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    for name, seed in (("a", "0"), ("b", "1")):
        argv = ["train", "--data", "digits", "--model", "cnn-tiny", "--out", str(root / name), "--seed", seed, *FAST]
        assert main(argv) == 0
    return root / "a", root / "b"


def _distill(*argv: str) -> list[str]:
    return ["distill", "--data", "digits", "--model", "cnn-tiny", *argv, *FAST]


def test_cli_two_weighted_teachers_and_hidden_labels(teachers, tmp_path, capsys):
    a, b = teachers
    out = tmp_path / "kd"
    code = main(_distill("--teacher", str(a), "--teacher", str(b), "--teacher-weights", "0.7,0.3",
                         "--labeled", "30", "--out", str(out)))
    assert code == 0, capsys.readouterr().err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["distill"]["teacher"] == [str(a), str(b)]
    assert config["distill"]["teacher_weights"] == [0.7, 0.3]
    assert config["labeled"] == 30
    assert json.loads((out / "results.json").read_text())["labeled"] == 30
    # a single --teacher stays as it was: one path, no weights, no labeled
    main(_distill("--teacher", str(a), "--out", str(tmp_path / "one")))
    config = yaml.safe_load((tmp_path / "one" / "config.yaml").read_text())
    assert config["distill"]["teacher"] == str(a) and "teacher_weights" not in config["distill"]
    assert "labeled" not in config


def test_python_ensemble_teaches_with_the_mean_of_logits(teachers, monkeypatch):
    stage = importlib.import_module("kdq.stages.distill")
    seen = {}
    real = stage.Distiller

    def spy(teacher, *args, **kwargs):  # noqa: ANN001
        seen["teacher"], seen["labeled"] = teacher, kwargs.get("labeled")
        return real(teacher, *args, **kwargs)

    monkeypatch.setattr(stage, "Distiller", spy)
    data = kdq.load_dataset("digits", subset=300)
    kdq.distill("cnn-tiny", list(teachers), data, teacher_weights=[1, 3], labeled=40, **PY_FAST)
    ens = seen["teacher"]
    assert isinstance(ens, Ensemble) and ens.weights == [0.25, 0.75]
    x = data.val.x[:8]
    a, _ = kdq.load_model(teachers[0])
    b, _ = kdq.load_model(teachers[1])
    with torch.no_grad():
        torch.testing.assert_close(ens.cpu()(x), 0.25 * a.eval()(x) + 0.75 * b.eval()(x))
    assert torch.equal(seen["labeled"].cpu(), labeled_mask(data.train.y, 40, 10, seed=0))


def test_train_labeled_trains_on_the_labeled_images_alone(tmp_path, monkeypatch):
    common = importlib.import_module("kdq.stages.common")
    sizes = []
    real = common.fit
    monkeypatch.setattr(common, "fit", lambda net, bundle, *a, **k: sizes.append(bundle.train.y.clone()) or
                        real(net, bundle, *a, **k))
    data = kdq.load_dataset("digits", subset=300)
    run = kdq.train("cnn-tiny", data, labeled=25, out=tmp_path / "base", seed=3, **PY_FAST)
    keep = labeled_mask(data.train.y, 25, 10, seed=3)
    assert torch.equal(sizes[0].cpu(), data.train.y[keep])
    assert run.results["labeled"] == 25
    assert yaml.safe_load((tmp_path / "base" / "config.yaml").read_text())["labeled"] == 25


BAD = [
    (["--labeled", "5"], "labeled (--labeled) must be an integer from 10"),
    (["--labeled", "100000"], "to 300"),
    (["--teacher-weights", "1,-1"], ">= 0"),
    (["--teacher-weights", "0,0"], "all 0"),
    (["--teacher-weights", "1"], "list of 2"),
    (["--teacher-weights", "a,b"], "separated by commas"),
    (["--method", "at"], "no single set of layers"),
    (["--labeled", "30", "--mixup", "0.2"], "mixup"),
]


@pytest.mark.parametrize("extra, words", BAD)
def test_bad_input_is_one_line(teachers, tmp_path, capsys, extra, words):
    a, b = teachers
    code = main(_distill("--teacher", str(a), "--teacher", str(b), "--out", str(tmp_path / "x"), *extra))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdq: error:") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "x").exists()  # refused before any training


def test_train_refuses_too_few_labels(tmp_path, capsys):
    code = main(["train", "--data", "digits", "--model", "cnn-tiny", "--labeled", "3", "--out", str(tmp_path / "x"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "from 10" in err and err.count("\n") == 1


def _experiment(tmp_path, kd: str) -> str:
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "name: ens\n"
        "data: {name: digits, subset: 300}\n"
        "train: {batch_size: 64, progress: false, epochs: 1}\n"
        "stages:\n"
        "  a: {model: cnn-tiny}\n"
        "  b: {model: cnn-tiny, seed: 1}\n"
        "  base: {model: cnn-tiny, labeled: 30}\n"
        f"  kd: {kd}\n"
    )
    return str(exp)


@pytest.mark.parametrize("kd, words", [
    ("{kind: distill, model: cnn-tiny, teacher: [a, nowhere]}", "neither an earlier stage"),
    ("{kind: distill, model: cnn-tiny, teacher: [a, b], teacher_weights: [1]}", "list of 2"),
    ("{kind: distill, model: cnn-tiny, teacher: [a, b], method: at}", "no single set of layers"),
    ("{kind: distill, model: cnn-tiny, teacher: a, labeled: 0}", "labeled must be an integer >= 1"),
    ("{kind: distill, model: cnn-tiny, teacher: [], labeled: 20}", "teacher must be"),
])
def test_yaml_refuses_bad_ensembles_before_any_work(tmp_path, kd, words):
    with pytest.raises(KdqError, match=words):
        load_experiment(_experiment(tmp_path, kd))


def test_yaml_teacher_list_of_earlier_stages(tmp_path, capsys):
    exp = _experiment(tmp_path, "{kind: distill, model: cnn-tiny, teacher: [a, b], teacher_weights: [2, 1], labeled: 30}")
    code = main(["run", exp, "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    config = yaml.safe_load((tmp_path / "o" / "kd" / "config.yaml").read_text())
    assert config["distill"]["teacher"] == [str(tmp_path / "o" / "a"), str(tmp_path / "o" / "b")]
    assert config["distill"]["teacher_weights"] == [2.0, 1.0] and config["labeled"] == 30
    assert json.loads((tmp_path / "o" / "base" / "results.json").read_text())["labeled"] == 30


@pytest.mark.slow
def test_quantized_teachers_and_qat_with_several_teachers(teachers, tmp_path, capsys):
    """An int8 run teaches beside a float one; int8 and low-bit QAT take the same teacher list."""
    a, b = teachers
    a8 = tmp_path / "a8"
    assert main(["quantize", str(a), "--out", str(a8), "--calibration-batches", "2"]) == 0
    assert main(_distill("--teacher", str(a8), "--teacher", str(b), "--out", str(tmp_path / "kd"))) == 0
    qat = ["--teacher", str(a8), "--teacher", str(b), "--epochs", "1", "--batch-size", "64", "--no-progress"]
    assert main(["qat", str(a), "--out", str(tmp_path / "q8"), "--freeze-bn-epoch", "1", *qat]) == 0
    assert main(["qat", str(a), "--out", str(tmp_path / "w4"), "--bits", "w4a4", *qat]) == 0
    for run in ("q8", "w4"):
        config = yaml.safe_load((tmp_path / run / "config.yaml").read_text())
        assert config["teacher"] == [str(a8), str(b)], run
    capsys.readouterr()
    code = main(["qat", str(a), "--out", str(tmp_path / "x"), "--distill-method", "at", *qat])
    assert code == 2 and "no single set of layers" in capsys.readouterr().err


@pytest.mark.parametrize("body, message", [
    ({"method": "dkd", "mixup": 0.2}, "dkd needs class labels, not the mixed targets of mixup/cutmix"),
    ({"teacher_mode": "cached", "cutmix": 1.0}, "a cached teacher cannot score mixed images"),
    ({"labeled": 50, "mixup": 0.2}, "labeled cannot hide the labels mixup/cutmix mix"),
])
def test_mixed_targets_are_refused_before_any_stage_runs(body, message, tmp_path):
    """The same checks as the Python entry point's, in the YAML schema: nothing trains first."""
    from kdq.config import parse_experiment

    raw = {"data": {"name": "digits"}, "stages": {"t": {"model": "cnn-small"},
                                                  "s": {"model": "cnn-tiny", "teacher": "t", **body}}}
    with pytest.raises(KdqError, match=message) as err:
        parse_experiment(raw)
    assert "\n" not in str(err.value)


def test_dkd_with_mixup_is_one_line_at_the_cli(teachers, tmp_path, capsys):
    argv = ["distill", "--model", "cnn-tiny", "--teacher", str(teachers[0]), "--data", "digits", *FAST,
            "--method", "dkd", "--mixup", "0.2", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dkd needs class labels" in err and not (tmp_path / "s").exists()
