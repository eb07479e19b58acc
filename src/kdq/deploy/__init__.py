"""Deployment: ONNX export, ONNX Runtime int8 quantization and evaluation."""

from kdq.deploy.metadata import kdq_metadata, load_onnx
from kdq.deploy.onnx_export import export_onnx, quantize_onnx_static
from kdq.deploy.ort import OrtModel, check_agreement, evaluate_onnx

__all__ = ["export_onnx", "quantize_onnx_static", "kdq_metadata", "OrtModel", "check_agreement", "evaluate_onnx", "load_onnx"]
