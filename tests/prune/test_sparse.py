"""The sparse file: bitmask + nonzero values, smaller than dense, loaded to identical outputs,
taken by load_run / evaluate / quantize / export like a float run; damaged manifests refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import kdq
from kdq.cli import main
from kdq.errors import KdqError
from kdq.models import create_model
from kdq.prune import Magnitude, load_sparse, prune_magnitude, read_manifest, save_sparse, sparse_sizes, sparsity_of
from kdq.prune.sparse import MANIFEST, TENSORS, pack_mask, unpack_mask
from kdq.rundir.claim import claim
from kdq.rundir.layout import WEIGHTS, write_config
from kdq.rundir.load import data_meta, data_record, run_format, save_model
from tests.conftest import TinyNet

@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_mask_bits_in_numpy_little_order(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert torch.equal(unpack_mask(packed, n), mask)


def test_unpack_refuses_wrong_sizes_and_stray_bits():
    with pytest.raises(KdqError, match="takes 2 uint8 bytes, got 1"):
        unpack_mask(torch.zeros(1, dtype=torch.uint8), 9)
    with pytest.raises(KdqError, match="bits set past its end"):
        unpack_mask(torch.tensor([0, 2], dtype=torch.uint8), 9)


def test_roundtrip_of_a_90_percent_sparse_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn-tiny", 10, 1).eval()
    prune_magnitude(model, Magnitude(0.9, scope="global"))
    save_sparse(tmp_path, model, {"classes": [str(i) for i in range(10)]})
    manifest = read_manifest(tmp_path / MANIFEST)
    encodings = {k: e["encoding"] for k, e in manifest["tensors"].items()}
    assert encodings["fc.weight"] == "bitmask" and encodings["stage3.1.0.weight"] == "bitmask"
    assert encodings["fc.bias"] == "dense" and encodings["stage1.0.1.running_mean"] == "dense"  # too small to gain
    assert manifest["sparsity"] == sparsity_of(model)["sparsity"]
    loaded = load_sparse(tmp_path).eval()
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    dense = (kdq.io.save_weights(tmp_path / "dense" / WEIGHTS, model.state_dict())).stat().st_size
    assert (tmp_path / TENSORS).stat().st_size < 0.2 * dense


def test_same_model_same_bytes(tmp_path):
    for out in ("a", "b"):
        torch.manual_seed(0)
        model = create_model("cnn-tiny", 10, 1)
        prune_magnitude(model, Magnitude(0.75, scope="global"))
        save_sparse(tmp_path / out, model, {"dataset": "digits"})
    for name in (MANIFEST, TENSORS):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_masked_model_is_saved_with_plain_keys(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn-tiny", 10, 1).eval()
    prune_magnitude(model, Magnitude(0.5), permanent=False)  # masks still attached
    save_sparse(tmp_path, model)
    assert "fc.weight" in read_manifest(tmp_path / MANIFEST)["tensors"]
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(load_sparse(tmp_path).eval()(x), model(x))


def test_a_users_module_needs_its_module_to_load(tmp_path):
    model = TinyNet().eval()
    prune_magnitude(model, Magnitude(0.5))
    save_sparse(tmp_path, model)
    with pytest.raises(KdqError, match="custom model .* module=YourModel"):
        load_sparse(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(load_sparse(tmp_path, TinyNet()).eval()(x), model(x))


def test_sparse_sizes_shrink_with_sparsity():
    rows = sparse_sizes(create_model("cnn-tiny", 10, 1), (0.5, 0.9, 0.98))
    assert [r["sparsity"] for r in rows] == [0.5, 0.9, 0.98]
    assert len({r["dense_bytes"] for r in rows}) == 1
    sizes = [r["sparse_bytes"] for r in rows]
    assert sizes == sorted(sizes, reverse=True) and all(r["ratio"] > 1.5 for r in rows)
    assert rows[1]["measured_sparsity"] == pytest.approx(0.9, abs=1e-3)


# ---- a sparse run directory, as the prune command writes it


@pytest.fixture(scope="module")
def digits():
    return kdq.load_dataset("digits", subset=300)


@pytest.fixture(scope="module")
def sparse_run(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    torch.manual_seed(0)
    model = create_model("cnn-tiny", 10, 1)  # untrained: loading, not accuracy, is under test
    with claim(root / "float", "float", "train"):
        write_config(root / "float", {"command": "train", "data": data_record(digits)})
        save_model(root / "float", model, data_meta(digits))
    prune_magnitude(model, Magnitude(0.9, scope="global"))
    out = root / "pruned"
    with claim(out, "float", "prune"):
        write_config(out, {"command": "prune", "source": str(root / "float"), "data": data_record(digits)})
        save_sparse(out, model, data_meta(digits))
    return out, model.eval(), root / "float"


def test_load_run_and_evaluate_take_a_sparse_run(sparse_run, digits):
    out, model, float_dir = sparse_run
    assert run_format(out).kind == "float" and run_format(out).marker == MANIFEST
    assert run_format(float_dir).marker == "model.json"  # the float run is still found as before
    run = kdq.load_run(out)
    assert torch.equal(run.model.eval()(digits.test.x), model(digits.test.x))
    assert run.meta["classes"] == list(digits.classes)
    results = kdq.evaluate(out, speed=False)
    assert results["runtime"] == "pytorch" and results["size_bytes"] == (out / TENSORS).stat().st_size
    assert results["size_bytes"] < 0.25 * (float_dir / WEIGHTS).stat().st_size


def test_quantize_and_export_take_a_sparse_run(sparse_run, tmp_path):
    out, _, _ = sparse_run
    results = kdq.quantize(out, tmp_path / "int8", calibration_batches=2, batch_size=64)
    assert results["runtime"] == "pytorch-int8" and (tmp_path / "int8" / "quantized.json").exists()
    info = kdq.export(out, tmp_path / "model.onnx")
    assert info["float_agreement"] >= 0.999


# ---- damaged and hostile manifests: one line, exit 2, nothing changed


def _first_bitmask(manifest):
    return next(k for k, e in manifest["tensors"].items() if e["encoding"] == "bitmask")


def _set_shape(shape):
    return lambda m, t: m["tensors"][_first_bitmask(m)].update(shape=shape)


def _short_mask(m, t):
    key = _first_bitmask(m)
    t[f"{key}::mask"] = t[f"{key}::mask"][:-1]


def _one_value_less(m, t):
    key = _first_bitmask(m)
    t[f"{key}::values"] = t[f"{key}::values"][:-1]


def _stray_bit(m, t):
    m["tensors"]["fc.weight"]["shape"] = [11, 29]  # 319 elements: the same 40 mask bytes, 1 spare bit
    t["fc.weight::mask"][-1] |= 0x80


def _extra_tensor(m, t):
    t["intruder"] = torch.zeros(3)


DAMAGE = {
    "mask too short": (_short_mask, "::mask: a mask of"),
    "values count": (_one_value_less, "::values should be"),
    "stray bit": (_stray_bit, "bits set past its end"),
    "extra tensor": (_extra_tensor, "does not name (intruder)"),
    # 1e5 x 1e5 x 1e5 elements: refused from the manifest, nothing allocated
    "huge shape": (_set_shape([100000, 100000, 100000]), "shape must be a shape of at most"),
    "string shape": (_set_shape(["x", 100000]), "shape[0] must be an integer"),
    "shape mismatch": (_set_shape([3, 3]), "takes 2 uint8 bytes"),
    "dtype": (lambda m, t: m["tensors"][_first_bitmask(m)].update(dtype="float16"), "float32 (the only dtype"),
    "no tensors": (lambda m, t: m.pop("tensors"), "tensors is missing"),
    "spec": (lambda m, t: m["spec"].update(num_classes="ten"), "spec.num_classes"),
    "format": (lambda m, t: m.update(format="kdq-int8"), "not a sparse kdq model"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_sparse_run_is_one_line(sparse_run, tmp_path, capsys, case):
    src, _, _ = sparse_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns(".kdq.lock"))
    manifest = json.loads((run_dir / MANIFEST).read_text())
    tensors = kdq.io.load_weights(run_dir / TENSORS)
    damage, message = DAMAGE[case]
    damage(manifest, tensors)
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    kdq.io.save_weights(run_dir / TENSORS, tensors)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    code = main(["evaluate", str(run_dir), "--no-speed"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("kdq: error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert message in lines[0] and str(run_dir) in lines[0] and len(lines[0]) < 600, lines[0]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")} == before
