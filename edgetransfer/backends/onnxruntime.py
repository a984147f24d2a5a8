"""ONNX Runtime on the CPU: the reference runtime for exported and quantized ONNX models."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IntegrityError, UsageError
from ..fsutil import atomic_path, sha256_file, write_json
from .base import Backend, Runner

MODEL_FILE = "model.onnx"
SESSION_JSON = "session.json"
PROVIDERS = ["CPUExecutionProvider"]


def onnx_precision(path: Path) -> str:
    """What the graph computes in: QDQ nodes mean INT8 kernels, otherwise the float type of the input."""
    try:
        import onnx
    except ImportError:
        return "unknown (onnx not installed)"
    model = onnx.load(str(path), load_external_data=False)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    elem = model.graph.input[0].type.tensor_type.elem_type
    return {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}.get(elem, "unknown")


class OnnxRuntimeRunner(Runner):
    def __init__(self, path: Path, *, threads: int = 0, providers: list[str] | None = None):
        self.path = path
        self.threads = threads
        self.providers = providers or ["CPUExecutionProvider"]
        self.session: Any = None
        self.description = f"onnxruntime {self.providers[0]}"

    def activate(self) -> None:
        import onnxruntime as ort

        if not self.path.exists():
            raise UsageError("ONNX model not found; run `edgetransfer export` first", path=self.path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types for malformed models
            raise IntegrityError(f"ONNX Runtime cannot load the model ({exc})", path=self.path) from exc
        self.precision = onnx_precision(self.path)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def deactivate(self) -> None:
        self.session = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return dict(zip(self.output_names, outs))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    install_hint = "pip install onnxruntime"

    def available(self) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return f"onnxruntime is not installed ({self.install_hint})"
        return None

    def compile(self, onnx: Path, target: Any, out: Path) -> Path:
        """Copy the ONNX file to `out/model.onnx` (atomically, after ORT has loaded it) + `out/session.json`.

        The session is built at load time from the portable ONNX file: a model saved through
        `optimized_model_filepath` at ORT_ENABLE_ALL holds hardware-specific (NCHWc) kernels and is
        only valid on the machine that made it, which is not the device when cross-compiling.
        """
        import onnxruntime as ort

        onnx, out = Path(onnx), Path(out)
        if not onnx.is_file():
            raise UsageError("ONNX model not found; run `edgetransfer export` first", path=onnx)
        threads = int(getattr(target, "threads", 0) or 0)
        final = out / MODEL_FILE
        with atomic_path(final) as tmp:
            shutil.copyfile(onnx, tmp)
            try:  # refuse what ORT cannot load before it takes the final name
                OnnxRuntimeRunner(tmp, threads=threads).activate()
            except IntegrityError as exc:
                why = str(exc.__cause__).replace(str(tmp), onnx.name)
                raise IntegrityError(f"ONNX Runtime cannot load the model ({why})", path=onnx) from exc
        write_json(out / SESSION_JSON, {
            "backend": self.name,
            "onnxruntime": ort.__version__,
            "model": MODEL_FILE,
            "device": getattr(target, "device", "cpu"),
            "precision": getattr(target, "precision", None),
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "intra_op_num_threads": threads,
            "execution_providers": PROVIDERS,
            "source": {"onnx": onnx.name, "sha256": sha256_file(final)},
        })
        return final

    def artifact_files(self, artifact: Path) -> list[Path]:
        """model.onnx and, when `compile` wrote it, session.json (the session options it runs with)."""
        path = Path(artifact)
        path = path / MODEL_FILE if path.is_dir() else path
        session = path.parent / SESSION_JSON
        return [path, session] if session.is_file() else [path]

    def load(self, artifact: Path, target: Any = None) -> Runner:
        path = Path(artifact)
        if path.is_dir():
            path = path / MODEL_FILE
        threads = getattr(target, "threads", None)
        if threads is None:  # no target: the options `compile` recorded, if any
            try:
                threads = json.loads((path.parent / SESSION_JSON).read_text(encoding="utf-8"))["intra_op_num_threads"]
            except (OSError, ValueError, KeyError, TypeError):
                threads = 0
        return OnnxRuntimeRunner(path, threads=int(threads or 0), providers=list(PROVIDERS))
