"""TensorRT for Jetson cameras: preflight (no TensorRT needed), on-device build kit, engine build and
runner (TensorRT's own API), and the sidecar that keeps engines on the device they were built for."""

from .backend import TensorRTBackend, TensorRTRunner

__all__ = ["TensorRTBackend", "TensorRTRunner"]
