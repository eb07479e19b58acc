"""Damaged and hostile files kdq reads: each is refused in one `kdq: error:` line naming the
file, with exit status 2, no traceback, nothing allocated from its sizes, and no earlier file
changed."""

from __future__ import annotations

import errno
import json
import shutil
import struct
import time

import onnx
import pytest
import torch

from kdq.cli import main
from kdq.errors import KdqError, short_repr

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--subset", "300"]
TRAIN = ["train", "--data", "digits", "--model", "cnn-tiny", *FAST]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv, names: str) -> str:
    """Run the CLI; assert exit 2 and a single `kdq: error:` line, the last, naming `names`."""
    code, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("kdq: error:")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert names in errors[0], errors[0]
    assert len(errors[0]) < 600  # never a huge value repeated back
    return errors[0]


def snapshot(folder):
    """Every visible file's bytes (the lock file holds a pid and is rewritten by design)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def copy_run(src, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".kdq.lock"))
    return dst


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "float"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def int8_run(float_run):
    out = float_run.parent / "int8"
    assert main(["quantize", str(float_run), "--out", str(out), "--calibration-batches", "2",
                 "--calibration-batch-size", "32"]) == 0
    return out


@pytest.fixture(scope="module")
def lowbit_run(float_run):
    out = float_run.parent / "lowbit"
    assert main(["qat", str(float_run), "--out", str(out), "--bits", "w4a4", "--epochs", "1",
                 "--batch-size", "64", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def onnx_file(float_run):
    out = float_run.parent / "model.onnx"
    assert main(["export", str(float_run), "--out", str(out)]) == 0
    return out


GARBAGE = {
    "truncated": lambda blob: blob[: len(blob) // 2],
    "garbage": lambda blob: b"this is not a weights file\n" * 10,
    "empty": lambda blob: b"",
    "huge header": lambda blob: struct.pack("<Q", 1 << 60) + blob[8:],
}


# ---- weights: model.safetensors, quantized.safetensors, packed.safetensors, best.safetensors


@pytest.mark.parametrize("damage", GARBAGE)
def test_damaged_model_weights_evaluate(float_run, tmp_path, capsys, damage):
    run_dir = copy_run(float_run, tmp_path)
    path = run_dir / "model.safetensors"
    path.write_bytes(GARBAGE[damage](path.read_bytes()))
    before = snapshot(run_dir)
    line = refused(capsys, "evaluate", run_dir, "--no-speed", names=str(path))
    assert "retrain it or rerun with --resume/--overwrite" in line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("command", ["quantize", "export", "distill"])
def test_damaged_model_weights_other_commands(float_run, tmp_path, capsys, command):
    run_dir = copy_run(float_run, tmp_path)
    path = run_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(run_dir)
    argv = {
        "quantize": ["quantize", run_dir, "--out", tmp_path / "q"],
        "export": ["export", run_dir, "--out", tmp_path / "m.onnx"],
        "distill": ["distill", "--teacher", run_dir, "--data", "digits", "--model", "cnn-tiny", *FAST,
                    "--out", tmp_path / "kd"],
    }[command]
    refused(capsys, *argv, names=str(path))
    assert snapshot(run_dir) == before


def test_damaged_quantized_weights(int8_run, tmp_path, capsys):
    run_dir = copy_run(int8_run, tmp_path)
    path = run_dir / "quantized.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    before = snapshot(run_dir)
    refused(capsys, "evaluate", run_dir, "--no-speed", names=str(path))
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_damaged_packed_weights(lowbit_run, tmp_path, capsys):
    run_dir = copy_run(lowbit_run, tmp_path)
    path = run_dir / "packed.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    before = snapshot(run_dir)
    refused(capsys, "evaluate", run_dir, "--no-speed", names=str(path))
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_damaged_packed_export_file(lowbit_run, tmp_path, capsys):
    from kdq.quant.lowbit.pack import load_packed

    out = tmp_path / "packed.safetensors"
    assert main(["export", str(lowbit_run), "--format", "packed", "--out", str(out)]) == 0
    capsys.readouterr()
    out.write_bytes(out.read_bytes()[:200])
    with pytest.raises(KdqError, match="packed.safetensors is truncated") as e:
        load_packed(out)
    assert "\n" not in str(e.value)


# ---- checkpoint.pt, best.safetensors and metrics.jsonl on --resume


def _checkpoint_cases():
    return {
        "truncated": lambda path: path.write_bytes(path.read_bytes()[:5000]),
        "garbage": lambda path: path.write_bytes(b"garbage\n"),
        "empty": lambda path: path.write_bytes(b""),
        "not a dict": lambda path: torch.save([1, 2, 3], path),
        "missing keys": lambda path: torch.save({"model": {}}, path),
        "wrong types": lambda path: torch.save({**torch.load(path, weights_only=True), "epoch": "three"}, path),
        "other model": lambda path: torch.save({**torch.load(path, weights_only=True),
                                                "model": {"fc.weight": torch.zeros(3, 3)}}, path),
    }


@pytest.mark.parametrize("damage", list(_checkpoint_cases()))
def test_damaged_checkpoint_on_resume(float_run, tmp_path, capsys, damage):
    run_dir = copy_run(float_run, tmp_path)
    _checkpoint_cases()[damage](run_dir / "checkpoint.pt")
    kept = {name: (run_dir / name).read_bytes() for name in ("model.safetensors", "model.json", "results.json")}
    line = refused(capsys, *TRAIN, "--out", run_dir, "--resume", names=str(run_dir / "checkpoint.pt"))
    assert "weights_only=False" not in line  # torch's advice to unpickle anything is never passed on
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept


def test_damaged_best_weights_on_resume(float_run, tmp_path, capsys):
    run_dir = copy_run(float_run, tmp_path)
    (run_dir / "best.safetensors").write_bytes(b"\x00" * 64)
    kept = (run_dir / "model.safetensors").read_bytes()
    refused(capsys, *TRAIN, "--out", run_dir, "--resume", names=str(run_dir / "best.safetensors"))
    assert (run_dir / "model.safetensors").read_bytes() == kept


def test_torn_last_metrics_line_is_dropped_on_resume(float_run, tmp_path, capsys):
    run_dir = copy_run(float_run, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"epoch": 2, "lr": 0.0')  # a crash mid-append: no newline
    code, _, err = run(capsys, *TRAIN, "--out", run_dir, "--resume")
    assert code == 0, err
    assert metrics.read_text() == whole


def test_garbage_metrics_line_in_the_middle(float_run, tmp_path, capsys):
    run_dir = copy_run(float_run, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("not json\n" + metrics.read_text())
    refused(capsys, *TRAIN, "--out", run_dir, "--resume", names=f"{metrics}: line 1")


# ---- JSON metadata: model.json, quantized.json, packed.json, ONNX metadata


def _edit_json(path, edit):
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


MODEL_JSON = {
    "not json": (lambda p: p.write_text("{oops"), "not valid JSON"),
    "a list": (lambda p: p.write_text("[1, 2]"), "must hold a JSON object"),
    "not utf-8": (lambda p: p.write_bytes(b'{"format": "\xff\xfe"}'), "not UTF-8"),
    "huge": (lambda p: p.write_bytes(b" " * (65 << 20)), "larger than 64 MB"),
    "no classes": (lambda p: _edit_json(p, lambda m: m.pop("classes")), "classes is missing"),
    "float shape": (lambda p: _edit_json(p, lambda m: m.update(input_shape=[1, 2e5, 2e5])), "input_shape[1]"),
    "negative shape": (lambda p: _edit_json(p, lambda m: m.update(input_shape=[1, -8, 8])), "input_shape[1]"),
    "classes type": (lambda p: _edit_json(p, lambda m: m.update(classes="0123")), "classes must be a list"),
    "num_classes": (lambda p: _edit_json(p, lambda m: m["architecture"].update(num_classes=10**12)),
                    "architecture.num_classes"),
    "arch type": (lambda p: _edit_json(p, lambda m: m.update(architecture=["cnn-tiny"])), "architecture must be"),
}


@pytest.mark.parametrize("case", MODEL_JSON)
def test_malformed_model_json(float_run, tmp_path, capsys, case):
    run_dir = copy_run(float_run, tmp_path)
    damage, message = MODEL_JSON[case]
    damage(run_dir / "model.json")
    before = snapshot(run_dir)
    line = refused(capsys, "evaluate", run_dir, "--no-speed", names=str(run_dir / "model.json"))
    assert message in line
    assert snapshot(run_dir) == before


QUANTIZED_JSON = {
    # 2 x 1 x 2e5 x 2e5 floats would be 320 GB: refused from the manifest, nothing allocated
    "huge input": (lambda m: m["recipe"].update(input_shape=[1, 200000, 200000]), "recipe.input_shape[1]"),
    "float input": (lambda m: m["recipe"].update(input_shape=[1, 2e5, 2e5]), "recipe.input_shape[1]"),
    "channels": (lambda m: m["recipe"].update(input_shape=[3, 8, 8]), "recipe.input_shape must be the input"),
    "no recipe": (lambda m: m.pop("recipe"), "recipe is missing"),
    "kind": (lambda m: m["recipe"].update(kind="magic"), "recipe.kind must be one of"),
    "spec": (lambda m: m["spec"].update(num_classes="ten"), "spec.num_classes"),
    "state entry": (lambda m: m["state"].update({next(iter(m["state"])): {"kind": "per_tensor"}}), ".dtype is missing"),
    "state": (lambda m: m.update(state=[]), "state must be a JSON object"),
    "missing tensor": (lambda m: m["state"].update({"extra.weight": {"kind": "tensor"}}), "does not match"),
}


@pytest.mark.parametrize("case", QUANTIZED_JSON)
def test_malformed_quantized_json(int8_run, tmp_path, capsys, case):
    run_dir = copy_run(int8_run, tmp_path)
    edit, message = QUANTIZED_JSON[case]
    _edit_json(run_dir / "quantized.json", edit)
    before = snapshot(run_dir)
    start = time.perf_counter()
    line = refused(capsys, "evaluate", run_dir, "--no-speed", names=str(run_dir / "quantized"))
    assert message in line
    assert time.perf_counter() - start < 30
    assert snapshot(run_dir) == before


def _first_weight(manifest):
    return next(iter(manifest["weights"].values()))


PACKED_JSON = {
    # would be a 10 GB string ("x" * 1e5 * 1e5) if the sizes were multiplied unchecked
    "string shape": (lambda m: _first_weight(m).update(shape=["x", 100000, 100000]), "shape[0]"),
    "float shape": (lambda m: _first_weight(m).update(shape=[1e5, 1e5]), "shape[0]"),
    "huge shape": (lambda m: _first_weight(m).update(shape=[100000, 100000, 100000]), "shape must be a shape of at most"),
    "bits": (lambda m: _first_weight(m).update(bits="4"), ".bits must be an integer"),
    "no lowbit": (lambda m: m.pop("lowbit"), "lowbit is missing"),
    "weights": (lambda m: m.update(weights="all"), "weights must be a JSON object"),
    "shape mismatch": (lambda m: _first_weight(m).update(shape=[1, 1, 1, 1]), "packed codes should be"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", PACKED_JSON)
def test_malformed_packed_json(lowbit_run, tmp_path, capsys, case):
    run_dir = copy_run(lowbit_run, tmp_path)
    edit, message = PACKED_JSON[case]
    _edit_json(run_dir / "packed.json", edit)
    before = snapshot(run_dir)
    line = refused(capsys, "evaluate", run_dir, "--no-speed", names=str(run_dir / "packed."))
    assert message in line
    assert snapshot(run_dir) == before


ONNX_META = {
    "no classes": (lambda m: m.pop("classes"), "classes is missing"),
    "mean type": (lambda m: m.update(mean="zero"), "mean must be a list"),
    "shape": (lambda m: m.update(input_shape=[1, 1e9, 8]), "input_shape[1]"),
    "precision": (lambda m: m.update(precision=8), "precision must be a string"),
}


@pytest.mark.parametrize("case", ONNX_META)
def test_onnx_metadata_of_the_wrong_shape(onnx_file, tmp_path, capsys, case):
    from kdq.deploy.onnx_export import get_metadata, set_metadata

    proto = onnx.load(str(onnx_file))
    meta = get_metadata(proto)
    edit, message = ONNX_META[case]
    edit(meta)
    set_metadata(proto, meta)
    path = tmp_path / "bad.onnx"
    onnx.save(proto, str(path))
    line = refused(capsys, "evaluate", path, "--no-speed", names=str(path))
    assert message in line and "kdq export" in line


# ---- kdq run: stage.json and results.json of an earlier run


EXPERIMENT = """
name: hostile
data: {name: digits, subset: 300}
train: {epochs: 1, batch_size: 64, progress: false}
stages:
  base: {kind: train, model: cnn-tiny}
"""


@pytest.fixture(scope="module")
def experiment_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experiment")
    (folder / "exp.yaml").write_text(EXPERIMENT)
    assert main(["run", str(folder / "exp.yaml"), "--out", str(folder / "out")]) == 0
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stage.json", "results.json"])
def test_garbage_stage_files_under_kdq_run(experiment_run, tmp_path, capsys, name):
    root = copy_run(experiment_run / "out", tmp_path, "out")
    (root / "base" / name).write_bytes(b"\x00garbage{")
    code, out, err = run(capsys, "run", experiment_run / "exp.yaml", "--out", root)
    assert code == 0, err
    assert "Traceback" not in err and f"{root / 'base' / name}" in err  # said once, as a warning
    assert "accuracy" in out
    assert json.loads((root / "base" / "results.json").read_text())["accuracy"] >= 0
    json.loads((root / "base" / "stage.json").read_text())  # rewritten whole


# ---- YAML experiment files


def _alias_bomb() -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    lines += ["name: bomb", "data: {name: digits}", "stages:", "  s: {kind: train, model: cnn-tiny, epochs: *i}"]
    return "\n".join(lines) + "\n"


YAML_FILES = {
    "deep": ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
    "deep block": ("".join(" " * i + f"k{i}:\n" for i in range(1000)) + " " * 1000 + "v: 1\n", "nested deeper than"),
    "alias bomb": (_alias_bomb(), "too many aliases"),
    "recursive": ("a: &a [*a]\n", "recursive"),
    "not utf-8": (b"name: \xff\xfe\n", "not UTF-8"),
    "huge": (b"#" * (5 << 20), "larger than 4 MB"),
}


@pytest.mark.parametrize("case", YAML_FILES)
def test_hostile_yaml(tmp_path, capsys, case):
    text, message = YAML_FILES[case]
    path = tmp_path / "exp.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.perf_counter()
    line = refused(capsys, "run", path, "--out", tmp_path / "out", names=str(path))
    assert message in line
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out").exists()


def test_short_repr_never_expands_a_shared_structure():
    value = ["x"] * 9
    for _ in range(9):
        value = [value] * 9  # 9**10 leaves if expanded
    start = time.perf_counter()
    text = short_repr(value)
    assert len(text) <= 60 and time.perf_counter() - start < 1
    assert "..." in short_repr("y" * 10**6) and len(short_repr("y" * 10**6)) <= 60
    assert short_repr({"a": 1}) == "{'a': 1}"


# ---- writing: disk full, read-only, out of memory


@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
                                        (errno.EACCES, "Permission denied")])
def test_write_failure_is_one_line_and_leaves_files_intact(float_run, tmp_path, capsys, monkeypatch, code, text):
    import kdq.io

    run_dir = copy_run(float_run, tmp_path)
    before = snapshot(run_dir)

    def fail(src, dst):
        raise OSError(code, text)

    monkeypatch.setattr(kdq.io.os, "replace", fail)
    line = refused(capsys, *TRAIN, "--out", run_dir, "--resume", names=f"cannot write {run_dir}")
    assert text in line
    assert snapshot(run_dir) == before
    assert not list(run_dir.glob(".*.tmp"))  # no temporary file left behind


def test_unexpected_os_and_memory_errors_are_one_line(capsys, monkeypatch):
    import kdq.cli

    def no_memory(args):
        raise MemoryError

    def no_access(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/file")

    monkeypatch.setitem(kdq.cli.COMMANDS, "datasets", no_memory)
    assert "out of memory" in refused(capsys, "datasets", names="")
    monkeypatch.setitem(kdq.cli.COMMANDS, "datasets", no_access)
    assert "Permission denied" in refused(capsys, "datasets", names="/some/file")


# ---- the readers directly


def test_read_json_and_weights_readers(tmp_path):
    from kdq.io import load_checkpoint, load_weights, read_json, weights_metadata

    path = tmp_path / "x.json"
    path.write_text('{"a": [' * 100000)  # deep nesting: json's RecursionError becomes one line
    with pytest.raises(KdqError, match="x.json is not valid JSON"):
        read_json(path)
    with pytest.raises(KdqError, match="cannot read .*missing.json"):
        read_json(tmp_path / "missing.json")
    blob = tmp_path / "w.safetensors"
    header = json.dumps({"t": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 16]}}).encode()
    blob.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)  # claims 40 GB, holds 16 bytes
    for reader in (load_weights, weights_metadata):
        with pytest.raises(KdqError, match="w.safetensors is damaged"):
            reader(blob)
    with pytest.raises(KdqError, match="w.safetensors is damaged"):
        load_checkpoint(blob)
