"""A new stage kind is one registration: its YAML kind, CLI verb and Python entry point follow.

The kind below lives only in this file; nothing else in kdq is edited to add it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdq.cli import main
from kdq.config import parse_experiment
from kdq.errors import KdqError
from kdq.experiment import run_experiment
from kdq.rundir import claim, read_results, write_results
from kdq.stages import STAGES, StageKind

FAST = {"epochs": 1, "batch_size": 64, "progress": False}


def relabel(run: str | Path, out: str | Path, *, note: str = "copied", repeat: int = 1, overwrite: bool = False) -> dict:
    """A trivial stage: the float run `run` copied to `out`, its results carrying `note` `repeat` times."""
    with claim(out, "float", "relabel", overwrite=overwrite):
        for name in ("model.safetensors", "model.json", "config.yaml"):
            shutil.copy(Path(run) / name, Path(out) / name)
        results = {**read_results(run), "note": " ".join([note] * repeat)}
        write_results(out, results)
    return results


@pytest.fixture
def relabel_kind():
    kind = STAGES.register(StageKind("relabel", relabel, "copy a float run with a note", writes="float"))
    yield kind
    STAGES.unregister("relabel")


def _experiment(stage: str) -> dict:
    return {"name": "new-kind", "data": {"name": "digits", "subset": 300},
            "train": FAST, "stages": {"base": {"kind": "train", "model": "cnn-tiny"}, "copy": stage}}


def test_the_yaml_schema_follows_the_entry_points_signature(relabel_kind):
    exp = parse_experiment(_experiment({"kind": "relabel", "source": "base", "note": "hi", "repeat": 2}))
    copy = exp.stages[1]
    assert (copy.kind, copy.model, copy.source, copy.options["note"]) == ("relabel", "cnn-tiny", "base", "hi")
    assert copy.train == {}  # the entry point takes no training options, so none are inherited
    with pytest.raises(KdqError, match=r"unknown key 'nite' in stage 'copy' \(did you mean note"):
        parse_experiment(_experiment({"kind": "relabel", "source": "base", "nite": "hi"}))
    with pytest.raises(KdqError, match="repeat must be an integer like its default 1"):
        parse_experiment(_experiment({"kind": "relabel", "source": "base", "repeat": "twice"}))
    with pytest.raises(KdqError, match="'epochs' does not apply to a relabel stage"):
        parse_experiment(_experiment({"kind": "relabel", "source": "base", "epochs": 2}))
    with pytest.raises(KdqError, match="source must name an earlier stage that writes a float model"):
        parse_experiment(_experiment({"kind": "relabel", "source": "nowhere"}))


def test_unknown_without_the_registration():
    with pytest.raises(KdqError, match="kind must be one of train"):
        parse_experiment(_experiment({"kind": "relabel", "source": "base"}))


def test_the_experiment_runs_it_and_the_cli_offers_it(relabel_kind, tmp_path, capsys):
    summary = run_experiment(parse_experiment(_experiment({"kind": "relabel", "source": "base", "note": "hi"})),
                             tmp_path / "exp")
    assert summary["stages"]["copy"]["note"] == "hi"
    assert summary["stages"]["copy"]["accuracy"] == summary["stages"]["base"]["accuracy"]
    assert any(line.startswith("| copy ") for line in summary["table"].splitlines())
    # the CLI verb: arguments derived from the signature
    out = tmp_path / "cli"
    assert main(["relabel", str(tmp_path / "exp" / "base"), "--out", str(out), "--note", "x", "--repeat", "3"]) == 0
    assert read_results(out)["note"] == "x x x"
    with pytest.raises(SystemExit) as exc:
        main(["relabel", str(tmp_path / "exp" / "base"), "--out", str(out), "--repeat", "many"])
    assert exc.value.code == 2
    assert "invalid int value" in capsys.readouterr().err
