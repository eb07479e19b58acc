"""Low-bit (1 to 16 bit) quantization-aware training: quantizers, drop-in layers, packed storage.

    from kdq.quant.lowbit import LowBitConfig, quantize_lowbit, save_packed, load_packed
    qmodel = quantize_lowbit(create_model("resnet20", 10, 3), LowBitConfig.parse("w4a4"))
    fit(qmodel, data, cfg)             # any training loop; kdq.engine.fit included
    save_packed(qmodel, "runs/w4a4")   # 4-bit codes, about 1/8 of the float weights
"""

from kdq.quant.lowbit.layers import (
    QUANT_LAYERS,
    LowBitConfig,
    QuantConv2d,
    QuantLinear,
    lowbit_layers,
    quantize_lowbit,
    rebuild_lowbit,
)
from kdq.quant.lowbit.pack import (
    load_packed,
    pack_codes,
    packed_nbytes,
    save_packed,
    unpack_codes,
)
from kdq.quant.lowbit.quantizers import (
    QUANTIZERS,
    BinaryQuantizer,
    DoReFaQuantizer,
    LSQQuantizer,
    PACTQuantizer,
    QuantCodes,
    Quantizer,
    TernaryQuantizer,
    UniformQuantizer,
    make_quantizer,
)

__all__ = [
    "QUANTIZERS",
    "QUANT_LAYERS",
    "BinaryQuantizer",
    "DoReFaQuantizer",
    "LSQQuantizer",
    "LowBitConfig",
    "PACTQuantizer",
    "QuantCodes",
    "QuantConv2d",
    "QuantLinear",
    "Quantizer",
    "TernaryQuantizer",
    "UniformQuantizer",
    "load_packed",
    "lowbit_layers",
    "make_quantizer",
    "pack_codes",
    "packed_nbytes",
    "quantize_lowbit",
    "rebuild_lowbit",
    "save_packed",
    "unpack_codes",
]
