"""Run directories are never silently damaged or mixed: kinds, finished runs, --resume checks,
the lock, evaluation files, plain stage names, --out paths and file modes (kdq.rundir)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdq.cli import main
from kdq.errors import KdqError
from kdq.rundir import check_name, check_resume, claim, run_state
from kdq.rundir.layout import LOCK_FILE, RUN_FILE

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--subset", "300"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) by its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, folder: Path, *argv) -> str:
    """Run the CLI, assert one `kdq: error:` line, exit 2 and that nothing in `folder` changed."""
    before = snapshot(folder) if folder.exists() else None
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.startswith("kdq: error:") and err.count("\n") == 1, err
    assert (snapshot(folder) if folder.exists() else None) == before
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished float run and an int8 run made from it (read-only: tests copy them)."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "--data", "digits", "--model", "cnn-tiny", "--out", str(root / "float"), *FAST]) == 0
    assert main(["quantize", str(root / "float"), "--out", str(root / "int8"), "--calibration-batches", "1"]) == 0
    return root


def copy(runs: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs / name, tmp_path / name))


def test_runs_record_their_kind_and_status(runs):
    assert json.loads((runs / "float" / RUN_FILE).read_text()) == {"kind": "float", "command": "train", "status": "finished"}
    assert run_state(runs / "int8")[:2] == ("int8", "finished")


def test_train_over_a_finished_run_is_refused(runs, tmp_path, capsys):
    run_dir = copy(runs, "float", tmp_path)
    err = refused(capsys, run_dir, "train", "--data", "digits", "--model", "cnn-tiny", "--out", run_dir, *FAST)
    assert "holds a finished float run" in err and "--overwrite" in err


def test_overwrite_replaces_an_int8_run_with_a_float_one(runs, tmp_path, capsys):
    run_dir = copy(runs, "int8", tmp_path)
    (run_dir / "model.onnx").write_bytes(b"the user's own file")
    err = refused(capsys, run_dir, "train", "--data", "digits", "--model", "cnn-tiny", "--out", run_dir, *FAST)
    assert "holds an int8 run (made by `kdq quantize`), not a float one" in err
    code, _, err = run(capsys, "train", "--data", "digits", "--model", "cnn-tiny", "--out", run_dir, "--overwrite", *FAST)
    assert code == 0, err
    # the old quantized model no longer hides the new float one; files kdq did not write stay
    assert not (run_dir / "quantized.json").exists() and not (run_dir / "quantized.safetensors").exists()
    assert (run_dir / "model.safetensors").exists() and (run_dir / "model.onnx").read_bytes() == b"the user's own file"
    assert run_state(run_dir)[:2] == ("float", "finished")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["command"] == "train"


def test_quantize_into_a_float_run_is_refused(runs, tmp_path, capsys):
    run_dir = copy(runs, "float", tmp_path)
    err = refused(capsys, run_dir, "quantize", runs / "float", "--out", run_dir, "--calibration-batches", "1")
    assert "holds a float run (made by `kdq train`), not an int8 one" in err


def test_quantize_over_a_finished_int8_run_needs_overwrite(runs, tmp_path, capsys):
    run_dir = copy(runs, "int8", tmp_path)
    err = refused(capsys, run_dir, "quantize", runs / "float", "--out", run_dir, "--calibration-batches", "1")
    assert "holds a finished int8 run" in err
    code, _, err = run(capsys, "quantize", runs / "float", "--out", run_dir, "--calibration-batches", "1", "--overwrite")
    assert code == 0, err


@pytest.mark.parametrize("extra, key", [
    (["--model", "mlp-small"], "model.name"),
    (["--model", "cnn-tiny", "--optimizer", "adamw"], "train.optimizer"),
    (["--model", "cnn-tiny", "--lr", "0.1"], "train.lr"),
    (["--model", "cnn-tiny", "--subset", "200"], "data.subset"),
])
def test_resume_with_another_model_optimizer_or_data_is_refused(runs, tmp_path, capsys, extra, key):
    run_dir = copy(runs, "float", tmp_path)
    argv = ["train", "--data", "digits", "--out", run_dir, "--resume", "--epochs", "2", "--batch-size", "64",
            "--no-progress", "--subset", "300", *extra]
    err = refused(capsys, run_dir, *argv)
    assert f"was started with {key} " in err, err


def test_resume_may_train_longer(runs, tmp_path, capsys):
    run_dir = copy(runs, "float", tmp_path)
    code, _, err = run(capsys, "train", "--data", "digits", "--model", "cnn-tiny", "--out", run_dir, "--resume",
                       "--epochs", "2", "--batch-size", "64", "--no-progress", "--subset", "300")
    assert code == 0, err
    assert "resuming from epoch 1 of 2" in err
    assert json.loads((run_dir / "results.json").read_text())["epochs_run"] == 2


def test_qat_into_another_kind_of_run_is_refused(runs, tmp_path, capsys):
    run_dir = copy(runs, "int8", tmp_path)
    err = refused(capsys, run_dir, "qat", runs / "float", "--bits", "w4a4", "--out", run_dir, "--epochs", "1")
    assert "holds an int8 run (made by `kdq quantize`), not a lowbit one" in err
    float_dir = copy(runs, "float", tmp_path)
    err = refused(capsys, float_dir, "qat", runs / "float", "--out", float_dir, "--epochs", "1", "--resume")
    assert "holds a float run" in err


@pytest.mark.slow
def test_recipe_folders_are_runs_too(runs, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["recipe", "individual", runs / "float", "--bits", "w4a4", "--out", out, "--epochs", "1",
            "--batch-size", "64", "--no-progress"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert run_state(out)[:2] == ("recipe", "finished") and run_state(out / "seed0" / "w4a4")[:2] == ("lowbit", "finished")
    err = refused(capsys, out, *argv)
    assert "holds a finished recipe run" in err
    err = refused(capsys, out, "train", "--data", "digits", "--model", "cnn-tiny", "--out", out, *FAST)
    assert "holds a recipe run" in err
    err = refused(capsys, out / "seed0" / "w4a4", "qat", runs / "float", "--bits", "w4a4", "--out", out / "seed0" / "w4a4",
                  "--resume", "--epochs", "1", "--batch-size", "64", "--lr", "0.5")
    assert "was started with train.lr 0.01" in err


def test_resume_and_overwrite_together_are_refused(runs, tmp_path, capsys):
    run_dir = copy(runs, "float", tmp_path)
    err = refused(capsys, run_dir, "train", "--data", "digits", "--model", "cnn-tiny", "--out", run_dir,
                  "--resume", "--overwrite", *FAST)
    assert "give one of them" in err


def test_an_interrupted_run_needs_resume_or_overwrite(runs, tmp_path, capsys):
    run_dir = copy(runs, "float", tmp_path)
    (run_dir / RUN_FILE).write_text(json.dumps({"kind": "float", "command": "train", "status": "running"}))
    err = refused(capsys, run_dir, "train", "--data", "digits", "--model", "cnn-tiny", "--out", run_dir, *FAST)
    assert "holds an interrupted float run" in err and "--resume" in err


def test_a_second_process_is_refused_while_the_lock_is_held(runs, tmp_path, capsys):
    run_dir = copy(runs, "float", tmp_path)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running kdq would
        os.ftruncate(fd, 0)
        os.write(fd, b"4242\n")
        err = refused(capsys, run_dir, "train", "--data", "digits", "--model", "cnn-tiny", "--out", run_dir,
                      "--resume", *FAST)
        assert "is in use by another kdq process (pid 4242)" in err
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        (fresh / LOCK_FILE).write_text("")
        held = os.open(fresh / LOCK_FILE, os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = refused(capsys, fresh, "quantize", runs / "float", "--out", fresh, "--calibration-batches", "1")
        assert "in use by another kdq process" in err
        os.close(held)
    finally:
        os.close(fd)


def test_the_lock_is_released_when_its_process_is_killed(tmp_path):
    run_dir = tmp_path / "r"
    code = (f"from kdq.rundir import claim\nwith claim({str(run_dir)!r}, 'float', 'train'):\n"
            "    print('held', flush=True)\n    import time; time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(KdqError, match=f"in use by another kdq process \\(pid {holder.pid}\\)"):
            with claim(run_dir, "float", "train", resume=True):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the OS drops the flock
        holder.wait()
    with claim(run_dir, "float", "train", resume=True):  # interrupted, so resumable
        pass
    assert run_state(run_dir)[:2] == ("float", "finished")


def test_claim_is_reentrant_and_a_late_bad_argument_leaves_nothing(tmp_path):
    run_dir = tmp_path / "new"
    with pytest.raises(KdqError, match="late"):
        with claim(run_dir, "lowbit", "qat-lowbit"):
            with claim(run_dir, "lowbit", "qat-lowbit"):  # a command calling another
                (run_dir / "config.yaml").write_text("command: qat-lowbit\n")
            raise KdqError("a bad argument found late")
    assert not run_dir.exists()


def test_evaluate_keeps_results_json_and_writes_eval_files(runs, tmp_path, capsys):
    run_dir = copy(runs, "float", tmp_path)
    results = (run_dir / "results.json").read_bytes()
    assert "train_time_s" in json.loads(results)
    code, out, err = run(capsys, "evaluate", run_dir, "--no-speed")
    assert code == 0, err
    assert f"wrote {run_dir / 'eval-test.json'}" in err
    assert json.loads((run_dir / "eval-test.json").read_text())["accuracy"] == json.loads(out)["accuracy"]
    assert (run_dir / "eval-test.png").exists()
    code, _, err = run(capsys, "evaluate", run_dir, "--no-speed", "--split", "val")
    assert code == 0 and (run_dir / "eval-val.json").exists() and "eval-val.json" in err
    code, _, err = run(capsys, "evaluate", run_dir, "--no-speed", "--data", "digits", "--subset", "100")
    assert code == 0 and json.loads((run_dir / "eval-digits-test.json").read_text())["split"] == "test"
    assert (run_dir / "results.json").read_bytes() == results
    int8 = copy(runs, "int8", tmp_path)
    results = (int8 / "results.json").read_bytes()
    code, _, err = run(capsys, "evaluate", int8, "--no-speed")
    assert code == 0 and (int8 / "eval-test.json").exists(), err
    assert (int8 / "results.json").read_bytes() == results


@pytest.mark.parametrize("stage, words", [
    *[(name, "is not a plain name") for name in ("../x", "/tmp/kdq-abs", "a/b", ".", "..", ".hidden", "x" * 65)],
    ("summary.json", "is the name of a file kdq writes"),
])
def test_stage_names_are_plain_names(stage, words, tmp_path, capsys):
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump({"data": {"name": "digits", "subset": 300},
                                   "stages": {stage: {"model": "cnn-tiny", "epochs": 1}}}))
    err = refused(capsys, tmp_path, "run", exp, "--out", tmp_path / "o")
    assert "stage name" in err and words in err
    assert not (tmp_path / "o").exists() and not Path("/tmp/kdq-abs").exists()


@pytest.mark.parametrize("name", ["../x", "/abs", "a b"])
def test_experiment_names_are_plain_names(name, tmp_path, capsys):
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump({"name": name, "data": {"name": "digits"}, "stages": {"a": {"model": "cnn-tiny"}}}))
    err = refused(capsys, tmp_path, "run", exp)
    assert "experiment name" in err and "is not a plain name" in err


def test_check_name():
    assert check_name("kd-int8_v1.2", "stage name") == "kd-int8_v1.2"
    for bad in ("", "-x", "a/b", "..", "a\nb", 3):
        with pytest.raises(KdqError, match="not a plain name"):
            check_name(bad, "stage name")


def test_a_stage_directory_the_experiment_did_not_write_is_refused_before_any_stage(runs, tmp_path, capsys):
    root = tmp_path / "o"
    root.mkdir()
    shutil.copytree(runs / "float", root / "b")  # someone's own run where stage b would go
    exp = tmp_path / "e.yaml"
    exp.write_text("data: {name: digits, subset: 300}\ntrain: {batch_size: 64, progress: false, epochs: 1}\n"
                   "stages: {a: {model: cnn-tiny}, b: {model: cnn-tiny}}\n")
    err = refused(capsys, root, "run", exp, "--out", root)
    assert f"{root / 'b'} holds a finished float run" in err
    assert not (root / "a").exists()


@pytest.mark.slow
def test_kdq_run_retrains_a_changed_stage_and_reuses_the_others(tmp_path, capsys):
    exp = tmp_path / "e.yaml"
    exp.write_text("data: {name: digits, subset: 300}\ntrain: {batch_size: 64, progress: false, epochs: 1}\n"
                   "stages: {a: {model: cnn-tiny}, q: {kind: quantize, source: a, calibration_batches: 1}}\n")
    root = tmp_path / "o"
    assert run(capsys, "run", exp, "--out", root)[0] == 0
    assert run_state(root)[:2] == ("experiment", "finished") and run_state(root / "q")[:2] == ("int8", "finished")
    code, _, err = run(capsys, "run", exp, "--out", root, "--set", "q.calibration_batches=2")
    assert code == 0, err
    assert "reusing finished stage a" in err and "reusing finished stage q" not in err
    assert yaml.safe_load((root / "q" / "config.yaml").read_text())["calibration_batches"] == 2
    # watching a run differently (progress bar, TensorBoard) does not make a finished stage stale
    code, _, err = run(capsys, "run", exp, "--out", root, "--set", "q.calibration_batches=2", "--set", "a.progress=true")
    assert code == 0 and "reusing finished stage a" in err and "reusing finished stage q" in err, err
    # a stage built on a retrained stage is redone, never reused on top of a model that is gone
    code, _, err = run(capsys, "run", exp, "--out", root, "--set", "q.calibration_batches=2", "--set", "a.lr=0.02")
    assert code == 0 and "reusing finished stage" not in err, err
    # an experiment never writes into another kind of run
    err = refused(capsys, root / "a", "run", exp, "--out", root / "a")
    assert "holds a float run" in err


def test_out_that_is_a_file_or_inside_one(runs, tmp_path, capsys):
    afile = tmp_path / "f.txt"
    afile.write_text("mine")
    err = refused(capsys, tmp_path, "train", "--data", "digits", "--model", "cnn-tiny", "--out", afile, *FAST)
    assert "is a file" in err
    err = refused(capsys, tmp_path, "quantize", runs / "float", "--out", afile / "x", "--calibration-batches", "1")
    assert f"lies inside the file {afile}" in err


def test_a_folder_kdq_did_not_write_is_refused(tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    err = refused(capsys, folder, "train", "--data", "digits", "--model", "cnn-tiny", "--out", folder, *FAST)
    assert "files kdq did not write (notes.txt" in err


def test_a_damaged_run_record_is_one_line(runs, tmp_path, capsys):
    run_dir = copy(runs, "float", tmp_path)
    (run_dir / RUN_FILE).write_text('{"kind": "nonsense"')
    err = refused(capsys, run_dir, "train", "--data", "digits", "--model", "cnn-tiny", "--out", run_dir, *FAST)
    assert "run.json" in err


def test_check_resume_allows_only_run_control_changes(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"command": "train", "model": {"name": "cnn-tiny"}, "data": {"name": "digits", "data_dir": "/a"},
         "train": {"epochs": 1, "lr": 0.05, "device": "cpu"}}))
    check_resume(tmp_path, {"command": "train", "model": {"name": "cnn-tiny"}, "data": {"name": "digits", "data_dir": "/b"},
                            "train": {"epochs": 5, "lr": 0.05, "device": "auto"}})
    with pytest.raises(KdqError, match="started with train.lr 0.05"):
        check_resume(tmp_path, {"command": "train", "model": {"name": "cnn-tiny"}, "data": {"name": "digits"},
                                "train": {"epochs": 1, "lr": 0.1}})


def test_written_files_follow_the_umask(tmp_path):
    from kdq.io import save_weights, write_text

    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        import torch

        save_weights(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640
    old = os.umask(0o002)
    try:
        write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o664
