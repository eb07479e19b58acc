"""Every stage kind that trains draws its curves; recipes and experiments say what is training."""

from __future__ import annotations

import pytest
import torch

import kdq
from kdq import recipes
from kdq.config import parse_experiment
from kdq.experiment import run_experiment
from kdq.recipes import bits as bits_module

FAST = {"epochs": 1, "batch_size": 64, "progress": False}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits():
    return kdq.load_dataset("digits", subset=300)


@pytest.fixture(scope="module")
def float_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "float"
    torch.manual_seed(0)
    kdq.train("cnn-tiny", digits, out=out, **FAST)
    return out


def _pictures(run_dir) -> list[str]:
    """Which of the two pictures a run directory holds, checked to be PNG files."""
    names = [n for n in ("training_curves.png", "confusion_matrix.png") if (run_dir / n).exists()]
    assert all((run_dir / n).read_bytes().startswith(PNG) for n in names)
    return names


@pytest.mark.parametrize("options", [{}, {"bits": "w4a4"}], ids=["int8", "lowbit"])
def test_qat_runs_draw_their_curves(float_run, digits, tmp_path, options):
    kdq.qat(float_run, tmp_path / "q", data=digits, **options, **FAST)
    assert _pictures(tmp_path / "q") == ["training_curves.png", "confusion_matrix.png"]
    assert _pictures(float_run) == ["training_curves.png", "confusion_matrix.png"]  # as train always did


def test_prune_draws_curves_only_when_it_trains(float_run, digits, tmp_path):
    kdq.prune(float_run, tmp_path / "tuned", method="magnitude", sparsity=0.5, data=digits, **FAST)
    assert _pictures(tmp_path / "tuned") == ["training_curves.png", "confusion_matrix.png"]
    kdq.prune(float_run, tmp_path / "oneshot", method="magnitude", sparsity=0.5, data=digits,
              **{**FAST, "epochs": 0})
    assert _pictures(tmp_path / "oneshot") == ["confusion_matrix.png"]  # nothing trained: no curves


def test_a_sweep_announces_each_scheme_and_seed(tmp_path, monkeypatch, capsys):
    trained = []

    def fake_qat(source, run_dir, *, bits, **options):  # the announcement, not the training, is under test
        trained.append((bits, options["seed"]))
        return {"accuracy": 0.5, "size_bytes": 10}

    monkeypatch.setattr(bits_module, "lowbit_qat", fake_qat)
    recipes.sweep("apprentice", tmp_path / "float", tmp_path / "sweep", bits=["w8a8", "w4a4", "w2a2"], seeds=[0, 1])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("apprentice")]
    assert lines == ["apprentice w8a8 seed 0 (1/6)", "apprentice w4a4 seed 0 (2/6)", "apprentice w2a2 seed 0 (3/6)",
                     "apprentice w8a8 seed 1 (4/6)", "apprentice w4a4 seed 1 (5/6)", "apprentice w2a2 seed 1 (6/6)"]
    assert trained == [("w8a8", 0), ("w4a4", 0), ("w2a2", 0), ("w8a8", 1), ("w4a4", 1), ("w2a2", 1)]


@pytest.mark.slow
def test_qkd_announces_its_phases(float_run, digits, tmp_path, capsys):
    recipes.run_recipe("qkd", float_run, tmp_path, bits="w4a4", data=digits, seed=3, **FAST)
    err = [line.strip() for line in capsys.readouterr().err.splitlines()]
    said = [line for line in err if line.startswith(("qkd", "phase"))]
    assert said == ["qkd w4a4 seed 3 (1/1)", "phase self_studying (1/3)", "phase co_studying (2/3)",
                    "phase tutoring (3/3)"]
    assert _pictures(tmp_path / "w4a4") == ["training_curves.png", "confusion_matrix.png"]


@pytest.mark.slow
def test_an_experiment_announces_each_stage(tmp_path, capsys):
    exp = parse_experiment({
        "name": "announce", "data": {"name": "digits", "subset": 300}, "train": FAST,
        "stages": {"teacher": {"kind": "train", "model": "cnn-tiny"},
                   "pruned": {"kind": "prune", "source": "teacher", "method": "channels", "ratio": 0.25, "epochs": 1,
                              "teacher": "teacher"}},
    })
    run_experiment(exp, tmp_path / "exp")
    err = capsys.readouterr().err
    stages = [line for line in err.splitlines() if line.startswith("[")]
    assert stages == [f"[1/2] teacher: train cnn-tiny -> {tmp_path / 'exp' / 'teacher'}",
                      f"[2/2] pruned: prune cnn-tiny channels from teacher taught by teacher -> {tmp_path / 'exp' / 'pruned'}"]
    assert _pictures(tmp_path / "exp" / "pruned") == ["training_curves.png", "confusion_matrix.png"]
