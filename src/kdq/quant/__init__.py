"""int8 quantization: static and dynamic post-training quantization, QAT, pickle-free save/load."""

from kdq.quant.ptq import BACKENDS, OBSERVERS, quantize_dynamic, quantize_static
from kdq.quant.qat import apply_qat_freeze, convert_qat, prepare_qat, qat_freeze_callback
from kdq.quant.serialize import load_quantized, save_quantized

__all__ = [
    "BACKENDS", "OBSERVERS", "quantize_static", "quantize_dynamic",
    "prepare_qat", "qat_freeze_callback", "apply_qat_freeze", "convert_qat",
    "save_quantized", "load_quantized",
]
