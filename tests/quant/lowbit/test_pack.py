"""Bit packing for 1 to 16 bits, and packed save/load of low-bit zoo models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdq.errors import KdqError
from kdq.io import load_weights, save_weights
from kdq.models import create_model
from kdq.quant.lowbit import (
    LowBitConfig,
    load_packed,
    lowbit_layers,
    pack_codes,
    packed_nbytes,
    quantize_lowbit,
    save_packed,
    unpack_codes,
)
from kdq.quant.lowbit.pack import MANIFEST, TENSORS


def _one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


# ---- pack_codes / unpack_codes


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("numel", [0, 1, 7, 13, 100])
def test_round_trip_every_width(bits, numel):
    g = torch.Generator().manual_seed(bits * 101 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g)
    if numel >= 2:
        codes[0], codes[-1] = 0, 2**bits - 1  # both extremes
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits) == -(-numel * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_byte_layout_is_little_endian():
    assert pack_codes(torch.tensor([1, 2, 15]), 4).tolist() == [0x21, 0x0F]
    assert pack_codes(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]
    # 5 = 101, 3 = 011, 7 = 111, least significant bit first: 1,0,1, 1,1,0, 1,1 | 1
    assert pack_codes(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 16), data=st.data())
def test_round_trip_and_numpy_layout(bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=64))
    codes = torch.tensor(values, dtype=torch.int64)
    packed = pack_codes(codes.reshape(-1, 1) if values else codes, bits)
    assert torch.equal(unpack_codes(packed, bits, len(values)), codes)
    stream = ((np.array(values, dtype=np.int64)[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    assert packed.numpy().tobytes() == np.packbits(stream, bitorder="little").tobytes()


def test_round_trip_across_chunks():
    codes = torch.randint(0, 8, (70_001,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, codes.numel()), codes)


def test_bad_codes():
    cases = [
        (lambda: pack_codes(torch.tensor([0, 4]), 2), "[0, 4)"),
        (lambda: pack_codes(torch.tensor([-1]), 2), "[0, 4)"),
        (lambda: pack_codes(torch.tensor([0.5]), 2), "integer tensor"),
        (lambda: pack_codes(torch.tensor([1]), 17), "bits must be an integer from 1 to 16"),
        (lambda: unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 8), "should be 4 uint8 bytes"),
    ]
    for build, hint in cases:
        with pytest.raises(KdqError) as err:
            build()
        assert hint in _one_line(err)


# ---- save_packed / load_packed


def _trained(name: str, config: LowBitConfig, steps: int = 3) -> torch.nn.Module:
    """A low-bit zoo model after a few SGD steps: quantizer state initialised and moved."""
    torch.manual_seed(0)
    model = quantize_lowbit(create_model(name, 4, 1), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


SCHEMES = {
    "lsq-w4a4": LowBitConfig(4, 4),
    "lsq-w2a2-per-tensor": LowBitConfig(2, 2, per_channel=False),
    "lsq-w1a1-all-layers": LowBitConfig(1, 1, first_last_bits=None),
    "dorefa-w2a2": LowBitConfig(2, 2, "dorefa", "dorefa", first_last_bits=None),
    "dorefa-w1-pact-a3": LowBitConfig(1, 3, "dorefa", "pact"),
    "binary-w1-uniform-a2": LowBitConfig(1, 2, "binary", "uniform"),
    "ternary-w2-lsq-a4": LowBitConfig(2, 4, "ternary", "lsq"),
    "uniform-w16a16": LowBitConfig(16, 16, "uniform", "uniform", first_last_bits=None),
    "lsq-w3-float-acts": LowBitConfig(3, None),
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_load_gives_identical_outputs(scheme, tmp_path):
    model = _trained("cnn-tiny", SCHEMES[scheme])
    save_packed(model, tmp_path, meta={"note": scheme})
    loaded = load_packed(tmp_path)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))  # bit for bit, not within a tolerance
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["meta"] == {"note": scheme} and manifest["spec"] == model.kdq_spec
    assert set(manifest["weights"]) == {f"{n}.weight" for n in lowbit_layers(model)}
    assert all(not m.weight.requires_grad for m in lowbit_layers(loaded).values())
    # what inference never reads is not stored: packed weights' quantizer state, BN batch counters
    stored = load_weights(tmp_path / TENSORS)
    assert not [k for k in stored if ".weight_quantizer." in k or k.endswith("num_batches_tracked")]
    assert any(".act_quantizer." in k for k in stored) or scheme in ("lsq-w3-float-acts", "dorefa-w2a2")


def test_resaving_a_loaded_model_and_resuming_training(tmp_path):
    model = _trained("resnet8", LowBitConfig(3, 3))
    save_packed(model, tmp_path / "a")
    loaded = load_packed(tmp_path / "a")
    save_packed(loaded, tmp_path / "b")
    first, second = load_weights(tmp_path / "a" / TENSORS), load_weights(tmp_path / "b" / TENSORS)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    again = load_packed(tmp_path / "b")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    for layer in lowbit_layers(loaded).values():
        layer.unfreeze_weight()
    loaded.train()
    F.cross_entropy(loaded(x), torch.tensor([0, 1, 2, 3])).backward()
    assert loaded.fc.weight.grad is not None


@pytest.mark.parametrize("bits", [2, 4])
def test_packed_weights_take_about_k_over_32_of_float(bits, tmp_path):
    model = _trained("resnet8", LowBitConfig(bits, bits), steps=1)
    save_packed(model, tmp_path / "packed")
    tensors = load_weights(tmp_path / "packed" / TENSORS)
    manifest = json.loads((tmp_path / "packed" / MANIFEST).read_text())
    packed_bytes = float_bytes = budget = 0.0
    for key, entry in manifest["weights"].items():
        numel = int(np.prod(entry["shape"]))
        codes = tensors[f"{key}::codes"]
        assert codes.numel() == packed_nbytes(numel, entry["bits"])  # the codes alone: exactly k bits each
        packed_bytes += sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(f"{key}::"))
        float_bytes += 4 * numel
        budget += 4 * numel * entry["bits"] / 32
    # codes + per-channel scales + zero points of every quantized layer (the 8-bit edge layers included)
    assert packed_bytes <= 1.10 * budget, (packed_bytes, budget, float_bytes)
    # and the whole file against the float model's safetensors
    save_weights(tmp_path / "float.safetensors", create_model("resnet8", 4, 1).state_dict())
    ratio = (tmp_path / "packed" / TENSORS).stat().st_size / (tmp_path / "float.safetensors").stat().st_size
    assert ratio < {2: 0.16, 4: 0.22}[bits], ratio


def test_save_and_load_errors(tmp_path):
    with pytest.raises(KdqError, match="made by quantize_lowbit"):
        save_packed(create_model("cnn-tiny", 4, 1), tmp_path)
    bare = quantize_lowbit(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), "w4a4")
    with pytest.raises(KdqError, match="kdq_spec"):
        save_packed(bare, tmp_path)
    with pytest.raises(KdqError, match="holds no packed low-bit model"):
        load_packed(tmp_path / "missing")
    save_packed(_trained("cnn-tiny", LowBitConfig(4, 4), steps=1), tmp_path / "ok")
    manifest = json.loads((tmp_path / "ok" / MANIFEST).read_text())
    (tmp_path / "ok" / MANIFEST).write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(KdqError) as err:
        load_packed(tmp_path / "ok")
    assert "not a packed low-bit kdq model" in _one_line(err)
