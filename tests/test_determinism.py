"""Same command, same --seed: byte-identical weights in a fresh process (the CPU needs no
--deterministic). Each command runs twice, in two new processes at once, and every
.safetensors file the two wrote must have the same sha256. About 7 s of CPU per process
(mostly imports), so only one command per kind is not marked slow."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from kdq.cli import main

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress"]
DATA = ["--data", "digits", "--subset", "300"]
TIMEOUT_S = 300


def _weights(folder: Path) -> dict[str, str]:
    """sha256 of every weights file under `folder`, by path inside it."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def _twice(tmp_path: Path, argv: list[str], python: list[str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """`kdq ARGV --out DIR` in two fresh processes at once; the weights each one wrote."""
    python = python or ["-m", "kdq.cli"]
    outs = [tmp_path / f"run{i}" for i in (1, 2)]
    procs = [subprocess.Popen([sys.executable, *python, *argv, "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, err[-2000:]
    return _weights(outs[0]), _weights(outs[1])


def _assert_same(tmp_path: Path, argv: list[str], expected: str) -> None:
    first, second = _twice(tmp_path, argv)
    assert expected in {Path(name).name for name in first}, first  # the comparison is not vacuous
    assert first == second


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """One float run that quantize, qat and the recipes start from."""
    out = tmp_path_factory.mktemp("determinism") / "float"
    assert main(["train", "--model", "cnn-tiny", *DATA, *FAST, "--out", str(out)]) == 0
    return out


def test_train(tmp_path):
    _assert_same(tmp_path, ["train", "--model", "cnn-tiny", *DATA, *FAST, "--seed", "3"], "model.safetensors")


@pytest.mark.slow
def test_the_check_sees_unseeded_initial_weights(tmp_path):
    """Without seeding before the model is built, two processes start from different weights."""
    unseeded = ["-c", "import sys, kdq.stages.train; kdq.stages.train.seed_everything = lambda *a, **k: None; "
                "from kdq.cli import main; sys.exit(main(sys.argv[1:]))"]
    first, second = _twice(tmp_path, ["train", "--model", "cnn-tiny", *DATA, *FAST, "--seed", "3"], unseeded)
    assert first["model.safetensors"] != second["model.safetensors"]


@pytest.mark.parametrize("mode", ["online", pytest.param("cached", marks=pytest.mark.slow)])
def test_distill(tmp_path, source, mode):
    argv = ["distill", "--model", "cnn-tiny", "--teacher", str(source), "--teacher-mode", mode, *DATA, *FAST, "--seed", "3"]
    _assert_same(tmp_path, argv, "model.safetensors")


@pytest.mark.parametrize("method", ["static", pytest.param("dynamic", marks=pytest.mark.slow)])
def test_quantize(tmp_path, source, method):
    argv = ["quantize", str(source), "--method", method, "--calibration-batches", "2"]
    _assert_same(tmp_path, argv, "quantized.safetensors")


@pytest.mark.slow
def test_qat_int8(tmp_path, source):
    _assert_same(tmp_path, ["qat", str(source), *FAST, "--seed", "3"], "quantized.safetensors")


def test_qat_lowbit(tmp_path, source):
    _assert_same(tmp_path, ["qat", str(source), "--bits", "w4a4", *FAST, "--seed", "3"], "packed.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("recipe, bits", [
    ("individual", "w4a4"), ("apprentice", "w4a4"), ("takd-chain", "w8a8,w4a4"), ("qkd", "w4a4"), ("speq", "w4a4"),
])
def test_recipe(tmp_path, source, recipe, bits):
    argv = ["recipe", recipe, str(source), "--bits", bits, "--seeds", "3", *FAST]
    _assert_same(tmp_path, argv, "packed.safetensors")
