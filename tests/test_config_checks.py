"""A YAML experiment is checked completely before any stage trains; teachers must match the data.

Every bad case is one `kdq: error:` line with exit 2, and `kdq run --out X` leaves no X behind.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

import kdq
from kdq.rundir.load import load_teacher, renormalize
from kdq.cli import main
from kdq.config import parse_experiment
from kdq.data import load_dataset
from kdq.errors import KdqError
from kdq.models import create_model
from kdq.models.registry import MAX_PARAMS, check_model

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--subset", "300"]
HEAD = "data: {name: digits, subset: 300}\nstages:\n  a: {model: cnn-tiny, epochs: 1}\n"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# (YAML text, words the one error line must hold). Stage `a` is valid and would train first:
# every case proves the problem is found before it does.
BAD_EXPERIMENTS = [
    # data: types and ranges
    ("data: {name: digits, subset: abc}\nstages: {a: {model: cnn-tiny}}\n", "data: subset must be a positive integer"),
    ("data: {name: digits, subset: 0}\nstages: {a: {model: cnn-tiny}}\n", "data: subset must be a positive integer"),
    ("data: {name: digits, subset: 2.5}\nstages: {a: {model: cnn-tiny}}\n", "data: subset"),
    ("data: {name: digits, val_size: 0}\nstages: {a: {model: cnn-tiny}}\n", "data: val_size must be a positive integer or a fraction in (0, 1)"),
    ("data: {name: digits, val_size: 1.5}\nstages: {a: {model: cnn-tiny}}\n", "data: val_size"),
    ("data: {name: digits, val_size: .nan}\nstages: {a: {model: cnn-tiny}}\n", "data: val_size"),
    ("data: {name: digits, seed: 1.0e+23}\nstages: {a: {model: cnn-tiny}}\n", "data: seed must be one of the integers"),
    ("data: {name: digits, seed: -1}\nstages: {a: {model: cnn-tiny}}\n", "data: seed"),
    ("data: {name: digits, seed: 8589934592}\nstages: {a: {model: cnn-tiny}}\n", "data: seed must be one of the integers from 0 to 4294967295"),
    ("data: {name: digits, download: maybe}\nstages: {a: {model: cnn-tiny}}\n", "data: download must be true or false"),
    ("data: {name: digits, data_dir: [x]}\nstages: {a: {model: cnn-tiny}}\n", "data: data_dir must be a folder path"),
    ("data: {name: [digits]}\nstages: {a: {model: cnn-tiny}}\n", "data: name must be a data set name"),
    ("data: {name: digitz}\nstages: {a: {model: cnn-tiny}}\n", "unknown data set 'digitz' (did you mean digits"),
    # training defaults: checked once, named by their section
    ("data: {name: digits}\ntrain: {epochs: many}\nstages: {a: {model: cnn-tiny}}\n", "train: epochs must be an integer"),
    # distillation keys
    (HEAD + "  b: {model: cnn-tiny, teacher: a, temperature: hot}\n", "stage 'b': temperature must be > 0 and finite, got 'hot'"),
    (HEAD + "  b: {model: cnn-tiny, teacher: a, temperature: .inf}\n", "stage 'b': temperature must be > 0 and finite, got inf"),
    (HEAD + "  b: {model: cnn-tiny, teacher: a, temperature: 1" + "0" * 400 + "}\n", "stage 'b': temperature must be > 0 and finite"),
    (HEAD + "  b: {model: cnn-tiny, teacher: a, alpha: .nan}\n", "stage 'b': alpha must be in [0, 1], got nan"),
    (HEAD + "  b: {model: cnn-tiny, teacher: a, alpha: '0.5'}\n", "stage 'b': alpha must be in [0, 1]"),
    (HEAD + "  b: {model: cnn-tiny, teacher: a, teacher_mode: lazy}\n", "stage 'b': teacher_mode must be one of"),
    (HEAD + "  b: {model: cnn-tiny, teacher: [a, 3]}\n", "stage 'b': teacher must be an earlier stage's name"),
    (HEAD + "  b: {kind: trian, model: cnn-tiny}\n", "stage 'b': kind must be one of train"),
    # int8 keys
    (HEAD + "  b: {kind: quantize, source: a, calibration_batches: many}\n", "stage 'b': calibration_batches must be an integer >= 1, got 'many'"),
    (HEAD + "  b: {kind: quantize, source: a, calibration_batches: 0}\n", "stage 'b': calibration_batches"),
    (HEAD + "  b: {kind: quantize, source: a, per_channel: 1}\n", "stage 'b': per_channel must be true or false"),
    (HEAD + "  b: {kind: quantize, source: a, skip: fc}\n", "stage 'b': skip must be a list of layer names"),
    (HEAD + "  b: {kind: quantize, source: a, skip: [1]}\n", "stage 'b': skip"),
    (HEAD + "  b: {kind: quantize, source: a, method: fast}\n", "stage 'b': method must be one of static, dynamic"),
    (HEAD + "  b: {kind: quantize, source: [a]}\n", "stage 'b': source must be an earlier stage's name"),
    (HEAD + "  b: {kind: quantize, source: a, model: resnet20}\n", "stage 'b': 'model' does not apply to a quantize stage"),
    (HEAD + "  b: {kind: qat, source: a, model_args: {width: 4}}\n", "stage 'b': 'model_args' does not apply to a qat stage"),
    (HEAD + "  b: {kind: qat, source: a, freeze_bn_epoch: -1}\n", "stage 'b': freeze_bn_epoch must be an integer >= 0"),
    (HEAD + "  b: {kind: qat, source: a, freeze_observer_epoch: 1.5}\n", "stage 'b': freeze_observer_epoch"),
    (HEAD + "  b: {kind: qat, source: a, epochs: .inf}\n", "stage 'b': epochs must be an integer"),
    # low-bit and recipe keys
    (HEAD + "  b: {kind: qat, source: a, bits: 4}\n", "stage 'b': bits must be a scheme such as w4a4"),
    (HEAD + "  b: {kind: qat, source: a, bits: [w4a4]}\n", "stage 'b': bits must be one scheme"),
    (HEAD + "  b: {kind: qat, source: a, bits: w4a4, quantizer: [lsq]}\n", "stage 'b': quantizer must be a quantizer name"),
    (HEAD + "  b: {kind: qat, source: a, bits: w4a4, first_last_bits: 99}\n", "stage 'b': first_last_bits must be an integer from 1 to 16"),
    (HEAD + "  b: {kind: recipe, recipe: individual, source: a, bits: w4a4, seeds: [0, 0]}\n", "stage 'b': seeds must be a list of different integers"),
    (HEAD + "  b: {kind: recipe, recipe: individual, source: a, bits: w4a4, seeds: [1.5]}\n", "stage 'b': seeds"),
    (HEAD + "  b: {kind: recipe, recipe: individual, source: a, bits: w4a4, seeds: []}\n", "stage 'b': seeds"),
    (HEAD + "  b: {kind: recipe, recipe: speq, source: a, bits: w4a4, cosine_weight: .inf}\n", "stage 'b': cosine_weight must be >= 0 and finite"),
    (HEAD + "  b: {kind: recipe, recipe: qkd, source: a, teacher: a, bits: w4a4, phases: [x]}\n", "stage 'b': phases must be a mapping"),
    (HEAD + "  b: {kind: recipe, recipe: [qkd], source: a, bits: w4a4}\n", "stage 'b': recipe must be a recipe name"),
    # model names and options of a later stage
    (HEAD + "  b: {model: cnn-tiyn}\n", "stage 'b': unknown model 'cnn-tiyn' (did you mean cnn-tiny"),
    (HEAD + "  b: {model: [cnn-tiny]}\n", "stage 'b': model must be a model name"),
    (HEAD + "  b: {model: cnn-tiny, teacher: a, model_args: {widht: 4}}\n", "stage 'b': model 'cnn-tiny' does not take 'widht' (did you mean width?); it takes: width, dropout"),
    (HEAD + "  b: {model: cnn-tiny, model_args: {width: abc}}\n", "stage 'b': model 'cnn-tiny': width must be an integer >= 1, got 'abc'"),
    (HEAD + "  b: {model: cnn-tiny, model_args: {dropout: .nan}}\n", "stage 'b': model 'cnn-tiny': dropout must be a number in [0, 1)"),
    (HEAD + "  b: {model: resnet8, model_args: {width: .inf}}\n", "stage 'b': model 'resnet8': width must be a finite number > 0"),
    (HEAD + "  b: {model: cnn-tiny, model_args: {width: 1000000}}\n", "stage 'b': model 'cnn-tiny' with options {'width': 1000000} has 2.79e+14 parameters"),
    (HEAD + "  b: {model: cnn-tiny, model_args: {width: 1000000000000000000000}}\n", "stage 'b': model 'cnn-tiny' cannot be built"),
    (HEAD + "  b: {model: cnn-tiny, model_args: [4]}\n", "stage 'b': model_args must be a mapping"),
    ("data: {name: synthetic}\nstages: {a: {model: mlp}, b: {model: cnn-tiny}}\n", "stage 'b': model 'cnn-tiny' needs images but data set 'synthetic' is tabular"),
    ("data: {name: synthetic}\nstages: {a: {model: mlp}, b: {model: mlp, model_args: {hidden: [100000, 100000]}}}\n", "over kdq's limit"),
    ("data: {name: synthetic}\nstages: {a: {model: mlp}, b: {model: mlp, model_args: {hidden: 64}}}\n", "hidden must be a list of layer sizes"),
    # compare names
    (HEAD + "compare: {student: [a]}\n", "compare.student names stage ['a'], which does not exist"),
    (HEAD + "compare: {student: b}\n", "compare.student names stage 'b', which does not exist"),
    (HEAD + "  b: {kind: recipe, recipe: individual, source: a, bits: w4a4}\ncompare: {baseline: a, student: b}\n",
     "compare.student names recipe stage 'b'"),
    ("out: [x]\ndata: {name: digits}\nstages: {a: {model: cnn-tiny}}\n", "the experiment: out must be a folder path"),
    # huge values are shortened in the message
    (HEAD + "  b: {model: cnn-tiny, " + "k" * 1000 + ": 1}\n", "unknown key 'kkkk"),
    (HEAD + "  b: {model: cnn-tiny, teacher: a, temperature: '" + "x" * 5000 + "'}\n", "stage 'b': temperature must be > 0"),
]


@pytest.mark.parametrize("text, words", BAD_EXPERIMENTS, ids=[f"case{i}" for i in range(len(BAD_EXPERIMENTS))])
def test_bad_experiment_is_refused_before_anything_runs(text, words, tmp_path, capsys):
    path, out = tmp_path / "bad.yaml", tmp_path / "out"
    path.write_text(text)
    code, stdout, err = run(capsys, "run", str(path), "--out", str(out))
    assert code == 2, err
    assert err.startswith("kdq: error: ") and err.count("\n") == 1, err
    assert words in err, err
    assert len(err) < 1000, err  # no value is printed in full
    assert not out.exists(), "nothing may be written before the whole file is checked"
    assert stdout == ""


@pytest.mark.parametrize("text, words", BAD_EXPERIMENTS[:3] + BAD_EXPERIMENTS[13:16])
def test_parse_experiment_raises_one_kdq_error(text, words):
    with pytest.raises(KdqError) as err:
        parse_experiment(yaml.safe_load(text))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_override_values_are_checked_too(tmp_path, capsys):
    path, out = tmp_path / "e.yaml", tmp_path / "out"
    path.write_text(HEAD + "  b: {model: cnn-tiny, teacher: a}\n")
    code, _, err = run(capsys, "run", str(path), "--out", str(out), "--set", "b.temperature=hot")
    assert code == 2 and err.count("\n") == 1 and "stage 'b': temperature must be > 0" in err, err
    code, _, err = run(capsys, "run", str(path), "--out", str(out), "--set", "data.subset=abc")
    assert code == 2 and err.count("\n") == 1 and "data: subset" in err, err
    assert not out.exists()


def test_valid_experiment_keeps_its_values():
    exp = parse_experiment(yaml.safe_load(
        HEAD
        + "  b: {model: cnn-tiny, teacher: a, temperature: 2, alpha: 0.5, model_args: {width: 4}}\n"
        + "  c: {kind: quantize, source: b, calibration_batches: 2, per_channel: false, skip: [fc]}\n"
        + "  d: {kind: qat, source: b, freeze_bn_epoch: 0, freeze_observer_epoch: null}\n"
        + "  e: {kind: recipe, recipe: individual, source: a, bits: [w4a4, w2a2], seeds: [0, 1]}\n"
        + "compare: {baseline: a, student: b}\n"
    ))
    b = exp.stages[1]
    assert (b.options["temperature"], b.options["alpha"], b.options["model_args"]) == (2, 0.5, {"width": 4})
    assert exp.stages[2].options == {"source": "b", "calibration_batches": 2, "per_channel": False, "skip": ["fc"]}
    assert exp.stages[4].options["seeds"] == [0, 1]


# ---- model options: names, types and size, before any memory is allocated


def test_huge_model_is_refused_without_allocating():
    start = time.perf_counter()
    with pytest.raises(KdqError, match=r"over kdq's limit of 2e\+09; lower width/depth") as err:
        create_model("cnn-tiny", 10, 1, width=1_000_000)
    assert "\n" not in str(err.value)
    assert time.perf_counter() - start < 10
    assert MAX_PARAMS == 2_000_000_000
    # the same check, used by `kdq run`, counts without building
    assert check_model("cnn-tiny", 10, 1) == sum(p.numel() for p in create_model("cnn-tiny", 10, 1).parameters())


@pytest.mark.parametrize("name, kwargs, words", [
    ("cnn-tiny", {"width": 10**30}, "cannot be built"),
    ("resnet20", {"width": 1e300}, "cannot be built"),
    ("mobilenetv2", {"width_mult": 1e6}, "over kdq's limit"),
    ("wrn-16-1", {"dropout": 1.5}, "dropout"),
    ("mlp", {"hidden": [1] * 5000}, "more than 1000"),
    ("cnn-tiny", {"x" * 1000: 1}, "does not take 'xxx"),
])
def test_absurd_model_options_are_one_short_line(name, kwargs, words):
    with pytest.raises(KdqError, match="lower width/depth|dropout|more than|does not take") as err:
        create_model(name, 10, 3, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 400


class _ReadsValues(torch.nn.Module):
    """A user's model whose constructor reads a tensor's value: it cannot be built on "meta"."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, width: int = 4) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(in_channels, num_classes)
        self.scale = float(torch.ones(1).sum().item()) * width


def test_user_model_that_needs_real_values_is_still_built(monkeypatch):
    from kdq.models.registry import MODELS, ModelEntry

    def reads_values(**kwargs) -> _ReadsValues:
        return _ReadsValues(**kwargs)

    monkeypatch.setitem(MODELS._items, "reads-values", ModelEntry(reads_values, "vector", "test"))
    assert check_model("reads-values", 10, 3) is None  # size unknown in advance: not refused
    assert create_model("reads-values", 10, 3, width=2).scale == 2.0
    with pytest.raises(KdqError, match="does not take 'wdth'"):  # its option names are still checked
        check_model("reads-values", 10, 3, wdth=2)


@pytest.mark.parametrize("arg, words", [
    ("width=1000000", "over kdq's limit of 2e+09; lower width/depth"),
    ("widht=4", "does not take 'widht' (did you mean width?); it takes: width, dropout"),
    ("width=abc", "width must be an integer >= 1, got 'abc'"),
    ("width=[4", "--model-arg 'width' is not valid YAML"),
    ("=4", "must look like NAME=VALUE"),
])
def test_bad_model_arg_on_the_command_line(arg, words, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", "digits", "--model", "cnn-tiny", "--model-arg", arg, "--out", str(out), *FAST)
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not out.exists()


# ---- a teacher must match the student's data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A digits run, and copies whose model.json claims other data (as a teacher trained elsewhere would)."""
    root = tmp_path_factory.mktemp("teachers")
    digits = root / "digits"
    assert main(["train", "--data", "digits", "--model", "cnn-tiny", "--out", str(digits), *FAST]) == 0
    claims = {
        "mnist": {"dataset": "mnist", "input_shape": [1, 28, 28]},  # same classes "0".."9", other shape
        "cifar": {"dataset": "cifar10", "input_shape": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
        "renamed": {"dataset": "usps"},  # same shape and classes, another data set
    }
    for name, changes in claims.items():
        shutil.copytree(digits, root / name)
        meta = json.loads((root / name / "model.json").read_text())
        meta.update(changes)
        (root / name / "model.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("teacher, words", [
    ("mnist", "was trained on 'mnist' (input 1x28x28, 10 classes) but the data is 'digits' (input 1x8x8, 10 classes)"),
    ("cifar", "was trained on 'cifar10' (input 3x32x32, 10 classes) but the data is 'digits' (input 1x8x8"),
    ("renamed", "was trained on 'usps' (input 1x8x8, 10 classes) but the data is 'digits'"),
])
def test_distill_refuses_a_teacher_trained_on_other_data(runs, teacher, words, tmp_path, capsys):
    out = tmp_path / "kd"
    code, _, err = run(capsys, "distill", "--teacher", str(runs / teacher), "--data", "digits", "--model", "cnn-tiny",
                       "--out", str(out), *FAST)
    assert code == 2 and err.count("\n") == 1, err
    assert words in err and "train a teacher on digits first" in err, err
    assert not out.exists()


def test_python_api_refuses_a_mismatched_teacher(runs):
    data = load_dataset("digits", subset=300)
    with pytest.raises(KdqError, match=r"input 1x28x28.*input 1x8x8.*train a teacher on digits first") as err:
        kdq.distill("cnn-tiny", runs / "mnist", data, epochs=1, progress=False)
    assert "\n" not in str(err.value)
    assert load_teacher(runs / "digits", data) is not None  # the matching teacher still loads


def test_module_teacher_must_take_the_data(runs):
    data = load_dataset("digits", subset=300)
    rgb = create_model("cnn-tiny", 10, 3)  # a 3-channel network, 10 outputs: only its input gives it away
    with pytest.raises(KdqError, match=r"does not take digits inputs of shape 1x8x8") as err:
        load_teacher(rgb, data)
    assert "\n" not in str(err.value)
    with pytest.raises(KdqError, match="outputs 5 classes but digits has 10 classes"):
        load_teacher(create_model("cnn-tiny", 5, 1), data)


def test_renormalising_never_broadcasts_channels(runs):
    data = load_dataset("digits", subset=300)
    meta = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    with pytest.raises(KdqError, match="saved for 3 input channels \\(mean\\) but digits has 1"):
        renormalize(data.test.x[:2], data, meta)
    with pytest.raises(KdqError, match="std"):
        renormalize(data.test.x[:2], data, {"mean": [0.0], "std": [0.0]})
    same = renormalize(data.test.x[:2], data, {"mean": [0.0], "std": [1.0]})
    assert torch.equal(same, data.test.x[:2] * torch.tensor(data.std) + torch.tensor(data.mean))


def test_evaluate_on_data_of_another_shape_is_one_line(runs, capsys):
    code, _, err = run(capsys, "evaluate", str(runs / "digits"), "--data", "synthetic", "--no-speed")
    assert code == 2 and err.count("\n") == 1, err
    assert "was trained on 'digits' (input 1x8x8, 10 classes) but the data is 'synthetic' (input 20 features" in err
    assert "--data digits" in err
    code, _, err = run(capsys, "evaluate", str(runs / "cifar"), "--no-speed")  # its recorded data is digits
    assert code == 2 and "input 3x32x32" in err and err.count("\n") == 1, err


def test_int8_teacher_is_checked_from_its_manifest(runs, tmp_path, capsys):
    q = tmp_path / "q"
    code, _, err = run(capsys, "quantize", str(runs / "digits"), "--out", str(q), "--calibration-batches", "1")
    assert code == 0, err
    manifest = json.loads((q / "quantized.json").read_text())
    manifest["meta"].update(dataset="mnist", input_shape=[1, 28, 28])
    (q / "quantized.json").write_text(json.dumps(manifest))
    out = tmp_path / "kd"
    code, _, err = run(capsys, "distill", "--teacher", str(q), "--data", "digits", "--model", "cnn-tiny", "--out", str(out), *FAST)
    assert code == 2 and err.count("\n") == 1 and "input 1x28x28" in err, err
    assert not out.exists()


def test_experiment_refuses_an_outside_teacher_of_other_data_before_training(runs, tmp_path, capsys):
    path, out = tmp_path / "e.yaml", tmp_path / "out"
    path.write_text(HEAD + f"  b: {{model: cnn-tiny, teacher: {runs / 'mnist'}}}\n")
    code, _, err = run(capsys, "run", str(path), "--out", str(out))
    assert code == 2 and err.count("\n") == 1, err
    assert "stage 'b': teacher" in err and "(input 1x28x28) but the experiment's data is 'digits' (input 1x8x8)" in err
    assert not out.exists()
    path.write_text(HEAD + f"  b: {{model: cnn-tiny, teacher: {runs / 'digits'}}}\n")
    assert parse_experiment(yaml.safe_load(path.read_text())).stages[1].teacher == str(runs / "digits")


def test_model_arg_given_twice(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", "digits", "--model", "cnn-tiny", "--model-arg", "width=4",
                       "--model-arg", "width=8", "--out", str(tmp_path / "r"), *FAST)
    assert code == 2 and "given twice" in err and err.count("\n") == 1 and not (tmp_path / "r").exists()
