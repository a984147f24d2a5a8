"""Backends by name, imported lazily so a missing optional framework costs nothing until asked for."""

from __future__ import annotations

import importlib

from ..errors import DependencyError, UsageError
from .base import Backend, Runner

_REGISTRY: dict[str, str] = {
    "torch": "edgetransfer.backends.torch:TorchBackend",
    "onnxruntime": "edgetransfer.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "edgetransfer.backends.openvino:OpenVinoBackend",
    "tensorrt": "edgetransfer.backends.tensorrt:TensorRTBackend",
}


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str, *, require: bool = True) -> Backend:
    """The backend called `name`; with `require`, a DependencyError (exit 3) when it cannot run here."""
    try:
        module_name, _, cls_name = _REGISTRY[name].partition(":")
    except KeyError as exc:
        raise UsageError(f"unknown backend {name!r}; known: {', '.join(backend_names())}", field="backend") from exc
    backend: Backend = getattr(importlib.import_module(module_name), cls_name)()
    if require and (reason := backend.available()) is not None:
        raise DependencyError(f"backend {name} is not usable here: {reason}")
    return backend


__all__ = ["Backend", "Runner", "backend_names", "get_backend"]
