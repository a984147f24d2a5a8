"""edgetransfer: adapt a pretrained backbone, export it, prove the export answers like the original.

The public API is listed here explicitly and imported on first use, so `import edgetransfer` (and
`edgetransfer --help`) stays cheap and works where torch or a backend is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "train": "edgetransfer.adapt.train",
    "TrainConfig": "edgetransfer.adapt.train",
    "TrainResult": "edgetransfer.adapt.train",
    "fit_anomaly": "edgetransfer.anomaly.fit",
    "PatchCoreConfig": "edgetransfer.anomaly.patchcore",
    "export_onnx": "edgetransfer.export",
    "validate": "edgetransfer.validate",
    "run_demo": "edgetransfer.demo",
    "generate_dataset": "edgetransfer.data.synthetic",
    "SyntheticConfig": "edgetransfer.data.synthetic",
    "scan_dataset": "edgetransfer.data.folder",
    "list_backbones": "edgetransfer.backbones",
    "select": "edgetransfer.select",
    "SelectResult": "edgetransfer.select",
    "get_backend": "edgetransfer.backends",
    "InputSpec": "edgetransfer.spec",
    "RunMeta": "edgetransfer.spec",
    "ParityReport": "edgetransfer.parity",
    "Gates": "edgetransfer.parity",
    "EdgeTransferError": "edgetransfer.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'edgetransfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
