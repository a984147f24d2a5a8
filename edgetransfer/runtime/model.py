"""A bundle opened for inference: its manifest, its preprocessing and its backend's runner.

Preprocessing comes from the manifest's input spec only and runs through the same function that
prepared images during training and validation (`edgetransfer.preprocess`), so a frame is fed to
the device's model exactly as the held-out images were fed when parity was proven.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ..backends import get_backend
from ..bundleformat import MANIFEST, build_target, check_files, extract_archive, kit_instructions, ran_precision, read_manifest
from ..errors import DependencyError, UsageError
from ..preprocess import load_image, preprocess, resize_and_crop, to_rgb
from ..spec import InputSpec, anomaly_outputs

ColorOrder = Literal["RGB", "BGR"]
Frame = Image.Image | np.ndarray | str | Path


@dataclass(frozen=True)
class Prediction:
    """The top class for one frame, its softmax score, and what it cost. From an anomaly bundle: the
    anomaly score (the threshold is 0.5), `label` "defect" or the good class, `index` 1 or 0, and the
    anomaly map over the model's input (H×W, same scale: 0.5 is the threshold)."""

    index: int
    label: str
    score: float
    latency_ms: float        # the backend's inference call
    preprocess_ms: float     # decode (for files), resize, crop, normalise
    logits: np.ndarray
    anomaly_map: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.label, "index": self.index, "score": round(self.score, 6),
                "latency_ms": round(self.latency_ms, 3), "preprocess_ms": round(self.preprocess_ms, 3)}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def to_image(frame: Frame, color: ColorOrder = "RGB") -> Image.Image:
    """A PIL image from a file path, a PIL image, or an HxW / HxWx3 uint8 array in `color` order.

    OpenCV hands out BGR frames: pass `color="BGR"`; the model's own channel order is applied later,
    from the manifest, by the shared preprocessing.
    """
    if isinstance(frame, (str, Path)):
        return load_image(frame)
    if isinstance(frame, Image.Image):
        return frame
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (1, 3)):
            raise UsageError(f"expected an HxW or HxWx3 uint8 frame, got {frame.dtype}{list(frame.shape)}",
                             field="frame")
        if frame.ndim == 3 and frame.shape[2] == 1:
            frame = frame[..., 0]
        if frame.ndim == 3 and color == "BGR":
            frame = frame[..., ::-1]
        return Image.fromarray(np.ascontiguousarray(frame))
    raise UsageError(f"cannot predict on a {type(frame).__name__}; pass a path, a PIL image or a uint8 array",
                     field="frame")


class BundleModel:
    """An opened bundle. Use as a context manager (or call `close`); `predict` is valid until closed."""

    def __init__(self, folder: Path, manifest: dict[str, Any], runner: Any, stack: contextlib.ExitStack,
                 open_ms: float):
        self.folder = folder
        self.manifest = manifest
        self.classes: list[str] = list(manifest["classes"])
        self.task: str = manifest.get("task", "classification")
        self.good: str = (manifest.get("anomaly") or {}).get("good") or "ok"
        self.input_spec = InputSpec.from_dict(manifest["input_spec"], source=folder / MANIFEST)
        self.runner = runner
        self.open_ms = open_ms
        self._stack = stack

    @property
    def digest(self) -> str:
        """The bundle's identity (its manifest's sha256 over every file's hash)."""
        return self.manifest["manifest_sha256"]

    @property
    def warnings(self) -> list[str]:
        """What the bundle's maker was warned about and shipped anyway (e.g. accuracy no better than
        chance); empty for a clean bundle. Recorded in the manifest by `bundle`."""
        return [str(w) for w in self.manifest.get("warnings") or []]

    @property
    def precision(self) -> str:
        return ran_precision(self.runner, self.manifest)

    @property
    def batch_range(self) -> tuple[int, int]:
        batch = self.manifest["target"].get("batch", {})
        return int(batch.get("min", 1)), int(batch.get("max", 1))

    def preprocess(self, frame: Frame, color: ColorOrder = "RGB") -> np.ndarray:
        """One frame → the (C, H, W) float32 input the model was validated with."""
        return preprocess(to_image(frame, color), self.input_spec)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed NCHW batch → logits (an anomaly bundle: scores)."""
        return self.runner.infer(batch)

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed NCHW batch → every output by name (an anomaly bundle: `score`, `anomaly_map`)."""
        return self.runner.infer_outputs(batch)

    def view(self, frame: Frame, *, color: ColorOrder = "RGB") -> Image.Image:
        """The pixels the model sees (resized and cropped as the manifest says, before normalising):
        what an anomaly map lies over."""
        return resize_and_crop(to_rgb(to_image(frame, color)), self.input_spec)

    def predict(self, frame: Frame, *, color: ColorOrder = "RGB") -> Prediction:
        """Top class of one frame (a path, a PIL image, or a uint8 array whose channels are in `color` order)."""
        return self.predict_batch([frame], color=color)[0]

    def predict_batch(self, frames: list[Frame], *, color: ColorOrder = "RGB") -> list[Prediction]:
        t0 = time.perf_counter()
        x = np.stack([self.preprocess(f, color) for f in frames])
        t1 = time.perf_counter()
        if self.task == "anomaly":  # one score and one map per frame, normalised so that the threshold is 0.5
            outs = self.infer_outputs(x)
            t2 = time.perf_counter()
            n = len(frames)
            scores, maps = anomaly_outputs(outs)
            scores = np.asarray(scores).reshape(-1)
            return [Prediction(index=int(s >= 0.5), label="defect" if s >= 0.5 else self.good, score=float(s),
                               latency_ms=(t2 - t1) * 1e3 / n, preprocess_ms=(t1 - t0) * 1e3 / n,
                               logits=np.array([s], dtype=np.float32),
                               anomaly_map=None if maps is None else np.asarray(maps[i], dtype=np.float32))
                    for i, s in enumerate(scores)]
        logits = self.infer(x)
        t2 = time.perf_counter()
        n = len(frames)
        probs = _softmax(logits)
        out = []
        for row, p in zip(logits, probs):
            i = int(p.argmax())
            out.append(Prediction(index=i, label=self.classes[i], score=float(p[i]), latency_ms=(t2 - t1) * 1e3 / n,
                                  preprocess_ms=(t1 - t0) * 1e3 / n, logits=row))
        return out

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> BundleModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_bundle(path: str | Path, *, check_hashes: bool = True) -> BundleModel:
    """Open a bundle folder or .tar.gz archive (safely extracted to a temporary folder) for inference.

    The manifest is checked and, with `check_hashes`, every model file is hashed before the backend
    reads it (exit 4 on a mismatch); the golden set is `verify`'s job. A bundle that holds a TensorRT
    build kit instead of an engine, or whose backend is not installed here, is exit 3.
    """
    t0 = time.perf_counter()
    path = Path(path)
    stack = contextlib.ExitStack()
    try:
        if path.is_dir():
            folder = path
        elif path.exists():
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="edgetransfer-bundle-"))
            folder = extract_archive(path, Path(tmp) / "bundle")
        else:
            raise UsageError("no such bundle folder or archive", path=path)
        manifest = read_manifest(folder)
        if check_hashes:
            check_files(folder, manifest, names=manifest["artifact"]["files"])
        if manifest["artifact"]["kind"] != "compiled":
            raise DependencyError(kit_instructions(manifest))
        backend = get_backend(manifest["backend"])
        runner = stack.enter_context(backend.load(folder / manifest["artifact"]["path"], build_target(manifest)))
    except BaseException:
        stack.close()
        raise
    return BundleModel(folder, manifest, runner, stack, open_ms=(time.perf_counter() - t0) * 1e3)
