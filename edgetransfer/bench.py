"""Latency and throughput of a runner, measured the same way for every backend."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from .backends.base import Runner


@dataclass
class Latency:
    batch: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def measure(runner: Runner, shape: tuple[int, int, int], *, batch: int = 1, warmup: int = 5,
            iterations: int = 30, min_seconds: float = 0.0, seed: int = 0) -> Latency:
    """Time `runner.infer` on a fixed random batch after `warmup` calls; the runner must be entered.

    Keeps going past `iterations` until `min_seconds` have elapsed, so fast models get enough samples
    for stable percentiles.
    """
    x = np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)
    for _ in range(warmup):
        runner.infer(x)
    times = []
    start = time.perf_counter()
    while len(times) < iterations or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        runner.infer(x)
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return Latency(batch=batch, iterations=len(times), p50_ms=float(np.percentile(ms, 50)),
                   p90_ms=float(np.percentile(ms, 90)), p99_ms=float(np.percentile(ms, 99)),
                   mean_ms=float(ms.mean()), images_per_s=float(batch * 1e3 / ms.mean()))
