"""`edgetransfer infer`: one JSON-ready record per frame of a source, then a summary.

A frame that cannot be decoded becomes an error record and the stream goes on (a camera box should
not stop on one bad file); the summary counts them and the CLI exits 2 when there were any.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, UsageError
from .model import BundleModel
from .overlay import overlay, write_overlay
from .sources import SourceFrame


@dataclass
class InferSummary:
    frames: int = 0
    errors: int = 0
    classes: Counter = field(default_factory=Counter)
    latency_ms: list[float] = field(default_factory=list)
    preprocess_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cold_start_ms: float | None = None   # open_bundle + the first prediction

    def add(self, record: dict[str, Any]) -> None:
        if "error" in record:
            self.errors += 1
            return
        self.frames += 1
        self.classes[record["class"]] += 1
        self.latency_ms.append(record["latency_ms"])
        self.preprocess_ms.append(record["preprocess_ms"])

    def to_dict(self) -> dict[str, Any]:
        lat = np.asarray(self.latency_ms or [np.nan])
        return {"frames": self.frames, "errors": self.errors, "classes": dict(sorted(self.classes.items())),
                "latency_p50_ms": _r(np.percentile(lat, 50)), "latency_p90_ms": _r(np.percentile(lat, 90)),
                "latency_p99_ms": _r(np.percentile(lat, 99)),
                "preprocess_mean_ms": _r(np.mean(self.preprocess_ms)) if self.preprocess_ms else None,
                "frames_per_s": _r(self.frames / self.seconds) if self.seconds > 0 else None,
                "cold_start_ms": _r(self.cold_start_ms) if self.cold_start_ms is not None else None}


def _stem(f: SourceFrame) -> str:
    """A file-name-safe name for a frame: the image's stem, or the video/camera name and frame number."""
    stem = Path(f.source).stem if f.frame is None else f"{Path(f.source).stem}-{f.frame}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80] or "frame"


def _r(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 3)


def infer_frames(model: BundleModel, frames: Iterator[SourceFrame], summary: InferSummary, *,
                 overlays: Path | None = None) -> Iterator[dict[str, Any]]:
    """Predict every frame; yield its record (source, frame, class, score, latency) and add it to `summary`.

    With `overlays` (an anomaly bundle only): each frame's anomaly map over the model's view of it is
    written to `overlays/<n>-<name>.png` and the record names the file.
    """
    if overlays is not None and model.task != "anomaly":
        raise UsageError("overlay pictures need an anomaly bundle (this one is a classifier: it has no map)",
                         field="--overlays")
    start = time.perf_counter()
    for n, f in enumerate(frames):
        record: dict[str, Any] = {"source": f.source, "frame": f.frame}
        try:
            p = model.predict(f.data, color=f.color)
            record.update(p.to_dict())
            if overlays is not None and p.anomaly_map is not None:
                name = f"{n:06d}-{_stem(f)}.png"
                picture = overlay(model.view(f.data, color=f.color), p.anomaly_map, score=p.score, label=p.label)
                record["overlay"] = str(write_overlay(picture, overlays / name))
        except DataError as exc:
            record["error"] = str(exc)
        if summary.cold_start_ms is None and "error" not in record:
            summary.cold_start_ms = model.open_ms + (time.perf_counter() - start) * 1e3
        summary.add(record)
        summary.seconds = time.perf_counter() - start
        yield record
