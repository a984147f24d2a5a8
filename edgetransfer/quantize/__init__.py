"""Calibration → one explicit-QDQ ONNX file, with a budget that keeps sensitive layers in fp32.

Why QDQ: TensorRT (explicit quantization), OpenVINO and ONNX Runtime all run QuantizeLinear /
DequantizeLinear graphs as real INT8, so one file serves every target (ARCHITECTURE.md, "Quantization").

Three concerns, one module each: `quantizers` (who quantizes: ONNX Runtime, NNCF, behind one
interface), `search` (`quantize_model`: which quantizer and which layers in fp32 meet every gate, by a
metric the caller passes), `qdq` (graph edits that make one file mean the same to every runtime).
"""

from .qdq import COMPUTE_OPS
from .quantizers import QUANTIZERS, NncfQuantizer, OnnxRuntimeQuantizer, Quantizer
from .search import TOP1, CompilerCheck, Goal, Metric, QuantizationReport, onnx_logits, quantization_advice, quantize_model

__all__ = ["COMPUTE_OPS", "QUANTIZERS", "TOP1", "CompilerCheck", "Goal", "Metric", "NncfQuantizer",
           "OnnxRuntimeQuantizer", "QuantizationReport", "Quantizer", "onnx_logits", "quantization_advice",
           "quantize_model"]
