"""Static and dynamic PTQ, pickle-free reload, and the errors a user can hit."""

from __future__ import annotations

import io
import json
import warnings
import zipfile

import pytest
import torch
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.nn.intrinsic import quantized as nniq

from kdq.errors import KdqError
from kdq.models import create_model, list_models, model_info, register_model
from kdq.quant import OBSERVERS, load_quantized, quantize_dynamic, quantize_static, save_quantized

# wrn-28-10 (36M parameters) is left out for time; its blocks are those of the other wrn-* variants.
IMAGE_MODELS = [n for n in list_models() if model_info(n).input_kind == "image" and n != "wrn-28-10"]
QUANT_CONVS = (nnq.Conv2d, nniq.ConvReLU2d)


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


def bn_calibrated(name: str, x: torch.Tensor) -> nn.Module:
    """A random model whose BN statistics match `x`, so activations have realistic ranges."""
    torch.manual_seed(0)
    model = create_model(name, 4, x.shape[1]).train()
    with torch.no_grad():
        for i in range(0, len(x), 64):
            model(x[i : i + 64])
    return model.eval()


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_zoo_model_quantizes(name):
    x = torch.randn(4, 3, 8, 8)
    q = quantize_static(create_model(name, 4, 3), x, observer="minmax")  # minmax: the fastest observer
    out = q(x)
    assert out.shape == (4, 4) and torch.isfinite(out).all()
    assert any(isinstance(m, QUANT_CONVS) for m in q.modules())


@pytest.mark.parametrize("name", ["cnn-small", "resnet8"])
@pytest.mark.parametrize("observer", OBSERVERS)
def test_int8_close_to_float(toy_data, name, observer):
    model = bn_calibrated(name, toy_data.train.x)
    ref = model(toy_data.val.x).detach()
    q = quantize_static(model, toy_data.train.x[:64], observer=observer)
    # Measured 30-35 dB (resnet8 ~30, cnn-small ~34, per-channel and per-tensor alike); 25 leaves margin.
    assert snr_db(ref, q(toy_data.val.x)) >= 25


def test_per_tensor_weights(toy_data):
    model = bn_calibrated("cnn-small", toy_data.train.x)
    q = quantize_static(model, toy_data.train.x[:32], per_channel=False, observer="minmax")
    weights = [m.weight() for m in q.modules() if isinstance(m, QUANT_CONVS)]
    # symmetric observers still yield per_tensor_affine tensors (with zero point 0) after convert
    assert weights and all(w.qscheme() == torch.per_tensor_affine and w.q_zero_point() == 0 for w in weights)
    assert snr_db(model(toy_data.val.x).detach(), q(toy_data.val.x)) >= 25  # measured ~34 dB


def test_dynamic_quantizes_linear_only(toy_data):
    torch.manual_seed(0)
    model = create_model("mlp", 4, 64).eval()
    x = toy_data.val.x.flatten(1)
    q = quantize_dynamic(model)
    linears = [m for m in q.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(linears) == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert snr_db(model(x).detach(), q(x)) >= 30  # measured ~38 dB


def test_skip_keeps_layer_float(toy_data):
    q = quantize_static(create_model("resnet8", 4, 1), toy_data.train.x[:16], observer="minmax", skip=["fc"])
    assert type(q.fc) is nn.Linear
    assert torch.isfinite(q(toy_data.val.x)).all()


def test_reload_without_pickle_is_identical(toy_data, tmp_path):
    model = bn_calibrated("resnet8", toy_data.train.x)
    q = quantize_static(model, toy_data.train.x[:32], observer="minmax", skip=["layer3.0.shortcut"])
    save_quantized(tmp_path, model.kdq_spec, q, {"note": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantized.json", "quantized.safetensors"]
    assert not zipfile.is_zipfile(tmp_path / "quantized.safetensors")  # torch.save files are zips
    assert b"\x80\x04" not in (tmp_path / "quantized.safetensors").read_bytes()[:16]  # no pickle header
    assert json.loads((tmp_path / "quantized.json").read_text())["meta"] == {"note": "test"}
    reloaded = load_quantized(tmp_path)
    assert torch.equal(reloaded(toy_data.val.x), q(toy_data.val.x))


def test_per_channel_metadata_is_compact_and_exact(toy_data, tmp_path):
    from safetensors.torch import load_file

    from kdq.quant.serialize import _narrowest

    model = bn_calibrated("mobilenetv2-x0.35", toy_data.train.x)
    q = quantize_static(model, toy_data.train.x[:32], observer="minmax")
    save_quantized(tmp_path, model.kdq_spec, q)
    stored = load_file(tmp_path / "quantized.safetensors")
    scales = [t for k, t in stored.items() if k.endswith("::scales")]
    zeros = [t for k, t in stored.items() if k.endswith("::zero_points")]
    assert scales and all(t.dtype == torch.float32 for t in scales)
    assert zeros and all(t.dtype == torch.int8 for t in zeros)
    original, reloaded = q.state_dict(), load_quantized(tmp_path).state_dict()
    for key, value in original.items():
        if isinstance(value, torch.Tensor) and value.is_quantized and value.qscheme() == torch.per_channel_symmetric:
            assert torch.equal(reloaded[key].q_per_channel_scales(), value.q_per_channel_scales())
            assert reloaded[key].q_per_channel_scales().dtype == torch.float64
    odd = torch.tensor([0.1, 1 / 3], dtype=torch.float64)  # not float32 numbers: kept as they are
    assert _narrowest(odd, (torch.float32,)).dtype == torch.float64


def test_reload_dynamic(tmp_path):
    model = create_model("mlp-small", 4, 16)
    q = quantize_dynamic(model)
    save_quantized(tmp_path, model.kdq_spec, q)
    x = torch.randn(5, 16)
    assert torch.equal(load_quantized(tmp_path)(x), q(x))


@pytest.mark.parametrize("kwargs, word", [({"backend": "tpu"}, "x86"), ({"observer": "max"}, "histogram")])
def test_bad_choice_lists_choices(kwargs, word):
    with pytest.raises(KdqError, match=word):
        quantize_static(create_model("cnn-tiny", 4, 1), torch.randn(2, 1, 8, 8), **kwargs)


def test_unknown_skip_name():
    with pytest.raises(KdqError, match="no such layer"):
        quantize_static(create_model("cnn-tiny", 4, 1), torch.randn(2, 1, 8, 8), skip=["fcc"])


class Gate(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


def test_untraceable_module_names_the_fix():
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(KdqError, match=r"'gate'.*--skip gate.*dynamic"):
        quantize_static(Gated(), x)
    q = quantize_static(Gated(), x, skip=["gate"])  # the suggested fix works
    assert isinstance(q.conv, nnq.Conv2d) and type(q.gate) is Gate


# ---- dynamic quantization of sequence models: LSTM, GRU, Linear, and attention left working


class SeqModel(nn.Module):
    """The sequence model of PyTorch's dynamic-quantization tutorials: LSTM and GRU, then Linear."""

    def __init__(self, num_classes: int = 4, in_channels: int = 64, *, steps: int = 8, hidden: int = 48) -> None:
        super().__init__()
        self.steps = steps
        self.lstm = nn.LSTM(in_channels // steps, hidden, num_layers=2, batch_first=True)
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).reshape(len(x), self.steps, -1)
        return self.fc(self.gru(self.lstm(x)[0])[0][:, -1])


def _seq_model(**kwargs) -> SeqModel:
    return SeqModel(**kwargs)


@pytest.fixture
def seq_model_name():
    """SeqModel registered as a model of the user's own, for this test only."""
    from kdq.models.registry import MODELS

    register_model("test-ptq-seq", input_kind="vector")(_seq_model)
    yield "test-ptq-seq"
    MODELS._items.pop("test-ptq-seq")  # other tests list every registered model


def torch_size(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # torch's own format: how PyTorch's tutorials report size
    return buffer.getbuffer().nbytes


def test_dynamic_covers_lstm_gru_and_linear():
    torch.manual_seed(0)
    model = SeqModel().eval()
    q = quantize_dynamic(model)
    assert type(q.lstm) is nnqd.LSTM and type(q.gru) is nnqd.GRU and type(q.fc) is nnqd.Linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.GRU, nn.Linear}, dtype=torch.qint8)
    assert torch_size(q) == torch_size(reference) < torch_size(model) / 3  # int8 weights, as PyTorch's own
    x = torch.randn(16, 64)
    assert snr_db(model(x).detach(), q(x).detach()) >= 30  # measured ~45 dB


def test_dynamic_keeps_transformer_encoder_working():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()  # its inference fast path is on: even heads, batch_first
    q = quantize_dynamic(model)
    assert type(q.layers[0].linear1) is nnqd.Linear
    assert type(q.layers[0].self_attn.out_proj) is not nnqd.Linear  # attention reads it as a tensor: stays float
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        assert snr_db(model(x), q(x)) >= 25  # measured ~35 dB
        padding = torch.zeros(3, 5, dtype=torch.bool)
        padding[0, 3:] = True  # the encoder's padded-batch path
        ref, out = model(x, src_key_padding_mask=padding), q(x, src_key_padding_mask=padding)
    assert snr_db(ref[~padding], out[~padding]) >= 25


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
def test_reload_dynamic_lstm_gru(tmp_path, dtype, seq_model_name):
    model = create_model(seq_model_name, 4, 64)
    q = quantize_dynamic(model, dtype=dtype)
    save_quantized(tmp_path, model.kdq_spec, q)
    x = torch.randn(5, 64)
    reloaded = load_quantized(tmp_path)  # rebuilt from a freshly initialised float model
    assert type(reloaded.lstm) is nnqd.LSTM
    assert torch.equal(reloaded(x), q(x))
