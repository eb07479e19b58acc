"""ONNX export and ONNX Runtime: float round trip, int8 QDQ quantization, metadata, bad files."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch

from kdq.deploy import OrtModel, check_agreement, evaluate_onnx, export_onnx, load_onnx, quantize_onnx_static
from kdq.errors import KdqError
from kdq.models import create_model

CLASSES = [f"c{i}" for i in range(4)]


def _meta(input_shape: tuple[int, ...]) -> dict:
    return {"classes": CLASSES, "mean": [0.0], "std": [1.0], "input_shape": input_shape,
            "dataset": "toy", "architecture": {"name": "test"}}


def _toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1x8x8 images whose class is the brightest quadrant (as in tests/conftest.py)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    for c in range(4):
        r, col = divmod(c, 2)
        x[y == c, :, r * 4 : r * 4 + 4, col * 4 : col * 4 + 4] += 1.5
    return x, y


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """cnn-tiny trained to high accuracy on the toy set, exported float and int8."""
    torch.manual_seed(0)
    x, y = _toy(512, seed=1)
    model = create_model("cnn-tiny", 4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):  # full-batch steps: ~1 s, enough to separate four bright quadrants
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    tmp = tmp_path_factory.mktemp("onnx")
    test_x, test_y = _toy(300, seed=2)
    fp = export_onnx(model, test_x[:64], tmp / "model.onnx", meta=_meta((1, 8, 8)))
    q = quantize_onnx_static(fp, x[:128], tmp / "model.int8.onnx")
    return model, fp, q, test_x, test_y


@pytest.mark.parametrize("name, shape", [
    ("cnn-tiny", (1, 28, 28)), ("resnet8", (1, 8, 8)), ("mobilenetv2-x0.35", (1, 8, 8)), ("mlp-small", (64,)),
])
def test_float_round_trip(name, shape, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, 4, shape[0] if len(shape) == 1 else 1).eval()
    x = torch.randn(32, *shape) * 3  # spread-out logits so argmax is not decided by ties
    path = export_onnx(model, x[:4], tmp_path / "m.onnx", meta=_meta(shape))
    ort = OrtModel(path)
    for batch in (1, 7):  # the batch axis is dynamic, not fixed at the example's 4
        assert ort(x[:batch]).shape == (batch, 4)
    result = check_agreement(model, ort, x)
    assert result["agreement"] == 1.0
    assert result["max_abs_diff"] < 1e-4
    assert torch.allclose(ort(x), model(x), atol=1e-4)


def test_metadata_survives_export_and_quantization(trained):
    _, fp, q, _, _ = trained
    for path, precision in ((fp, "float32"), (q, "int8")):
        meta = OrtModel(path).meta
        assert meta["precision"] == precision and meta["producer"] == "kdq"
        assert meta["classes"] == CLASSES and meta["input_shape"] == [1, 8, 8] and meta["dataset"] == "toy"
    # exactly one kdq entry, even though quantization copied the float file's
    assert [p.key for p in onnx.load(str(q)).metadata_props].count("kdq") == 1


def test_int8_is_qdq_smaller_and_agrees(trained):
    model, fp, q, test_x, test_y = trained
    ops = Counter(n.op_type for n in load_onnx(q)[0].graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    float_res = evaluate_onnx(fp, test_x, test_y, speed=False)
    int8_res = evaluate_onnx(q, test_x, test_y)
    assert float_res["accuracy"] > 0.9
    assert int8_res["accuracy"] >= float_res["accuracy"] - 0.02
    assert check_agreement(model, OrtModel(q), test_x)["agreement"] >= 0.97
    assert int8_res["runtime"] == "onnxruntime" and int8_res["precision"] == "int8"
    assert int8_res["latency_ms_batch1"] > 0 and int8_res["throughput_per_s"] > 0
    assert int8_res["size_bytes"] < float_res["size_bytes"]


def test_int8_size_ratio_resnet8(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet8", 4, 1).eval()
    x = torch.randn(32, 1, 8, 8)
    fp = export_onnx(model, x[:4], tmp_path / "r8.onnx", meta=_meta((1, 8, 8)))
    q = quantize_onnx_static(fp, x, tmp_path / "r8.int8.onnx")
    assert q.stat().st_size / fp.stat().st_size < 0.4  # measured 0.34: int8 weights, int32 biases


def test_float_export_matches_on_trained_model(trained):
    model, fp, _, test_x, _ = trained
    result = check_agreement(model, OrtModel(fp), test_x)
    assert result["agreement"] >= 0.999 and result["max_abs_diff"] < 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter, used to make a non-kdq file
def test_bad_files(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(KdqError, match="not a valid ONNX file"):
        OrtModel(junk)
    with pytest.raises(KdqError, match="not found"):
        OrtModel(tmp_path / "missing.onnx")
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),), str(plain), dynamo=False)
    with pytest.raises(KdqError, match="kdq export"):
        OrtModel(plain)
    with pytest.raises(KdqError, match="kdq export"):
        quantize_onnx_static(plain, torch.randn(4, 3), tmp_path / "q.onnx")


def test_bad_arguments(trained, tmp_path):
    _, fp, q, test_x, _ = trained
    with pytest.raises(KdqError, match="calibrate_method"):
        quantize_onnx_static(fp, test_x, tmp_path / "x.onnx", calibrate_method="nope")
    with pytest.raises(KdqError, match="already int8"):
        quantize_onnx_static(q, test_x, tmp_path / "x.onnx")
    with pytest.raises(KdqError, match="classes"):
        export_onnx(create_model("cnn-tiny", 4, 1), test_x[:2], tmp_path / "y.onnx", meta={"mean": [0], "std": [1]})


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2-x0.35", "cnn-tiny"])
def test_pytorch_int8_model_exports_with_its_own_scales(name, tmp_path):
    from kdq.deploy.onnx_export import get_metadata
    from kdq.quant import quantize_static

    torch.manual_seed(0)
    model = create_model(name, 4, 1).eval()
    x = torch.randn(64, 1, 8, 8) * 2
    qmodel = quantize_static(model, x, observer="minmax")
    path = export_onnx(qmodel, x[:2], tmp_path / "q.onnx", meta=_meta((1, 8, 8)))
    proto = onnx.load(str(path))
    assert get_metadata(proto)["precision"] == "int8"
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    ref, got = qmodel(x), OrtModel(path)(x)
    # same scales, same integer grid: the runtimes differ by at most a few quantization steps
    step = qmodel.fc.scale if hasattr(qmodel.fc, "scale") else 1.0
    assert (ref - got).abs().max().item() <= 3 * step + 1e-6


def test_relu6_clip_runs_on_integers(tmp_path):
    """MobileNetV2's unfused ReLU6 becomes an integer Clip, not a float detour between QDQ pairs."""
    from kdq.deploy.onnx_export import clip_in_integers
    from kdq.quant import quantize_static

    torch.manual_seed(0)
    model = create_model("mobilenetv2-x0.35", 4, 1).eval()
    x = torch.randn(64, 1, 8, 8) * 2
    qmodel = quantize_static(model, x, observer="minmax")
    path = export_onnx(qmodel, x[:2], tmp_path / "q.onnx", meta=_meta((1, 8, 8)))
    proto = onnx.load(str(path))
    assert clip_in_integers(proto) == 0  # already done at export: nothing left to rewrite
    inits = {t.name: t for t in proto.graph.initializer}
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    assert clips and all(inits[n.input[1]].data_type == onnx.TensorProto.UINT8 for n in clips)
