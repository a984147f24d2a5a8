"""`edgetransfer infer`: one JSON-ready record per frame of a source, then a summary.

A frame that cannot be decoded becomes an error record and the stream goes on (a camera box should
not stop on one bad file); the summary counts them and the CLI exits 2 when there were any.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError
from .model import BundleModel
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


def _r(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 3)


def infer_frames(model: BundleModel, frames: Iterator[SourceFrame], summary: InferSummary) -> Iterator[dict[str, Any]]:
    """Predict every frame; yield its record (source, frame, class, score, latency) and add it to `summary`."""
    start = time.perf_counter()
    for f in frames:
        record: dict[str, Any] = {"source": f.source, "frame": f.frame}
        try:
            record.update(model.predict(f.data, color=f.color).to_dict())
        except DataError as exc:
            record["error"] = str(exc)
        if summary.cold_start_ms is None and "error" not in record:
            summary.cold_start_ms = model.open_ms + (time.perf_counter() - start) * 1e3
        summary.add(record)
        summary.seconds = time.perf_counter() - start
        yield record
