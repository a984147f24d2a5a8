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


def batch_sizes(lo: int, opt: int, hi: int) -> list[int]:
    """The batch sizes worth timing for a target that allows lo..hi: its bounds and its optimum."""
    return sorted({lo, opt, hi})


@dataclass
class BenchReport:
    """Latency per batch size of one deployed artifact, and where and how it was measured."""

    subject: str
    backend: str
    precision: str
    results: list[Latency]
    machine: dict[str, str]
    cold_start_ms: float | None = None  # bundles: open_bundle + first prediction, in this process

    def to_dict(self) -> dict:
        return {"subject": self.subject, "backend": self.backend, "precision": self.precision,
                "cold_start_ms": self.cold_start_ms, "machine": self.machine,
                "results": [r.to_dict() for r in self.results]}


def _machine() -> dict[str, str]:
    import os
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": str(os.cpu_count()),
            "platform": platform.platform(), "python": platform.python_version()}


def _measure_all(runner: Runner, shape: tuple[int, int, int], batches: list[int], **kw: float) -> list[Latency]:
    return [measure(runner, shape, batch=b, **kw) for b in batches]  # type: ignore[arg-type]


def bench_bundle(path: str, *, batches: list[int] | None = None, warmup: int = 10, iterations: int = 50,
                 min_seconds: float = 1.0) -> BenchReport:
    """Open the bundle (timing its cold start: open + first prediction), then time every batch size
    its target allows (or `batches`)."""
    from .runtime import open_bundle

    t0 = time.perf_counter()
    model = open_bundle(path)
    with model:
        spec = model.input_spec
        probe = np.zeros((spec.height, spec.width, 3), dtype=np.uint8)
        model.predict(probe)
        cold = (time.perf_counter() - t0) * 1e3
        lo, hi = model.batch_range
        opt = int(model.manifest["target"].get("batch", {}).get("opt", lo))
        results = _measure_all(model.runner, (3, spec.height, spec.width), batches or batch_sizes(lo, opt, hi),
                               warmup=warmup, iterations=iterations, min_seconds=min_seconds)
        return BenchReport(subject=f"bundle {path} ({model.manifest['target']['name']})",
                           backend=model.manifest["backend"], precision=model.precision, results=results,
                           machine=_machine(), cold_start_ms=cold)


def bench_run(run: str, target: str, *, batches: list[int] | None = None, warmup: int = 10, iterations: int = 50,
              min_seconds: float = 1.0) -> BenchReport:
    """Time the compiled artifact in RUN/<target>/ on this machine (the workstation side of `bench`)."""
    from pathlib import Path

    from .spec import RunMeta
    from .stages import as_target, load_compiled

    tgt = as_target(target)
    spec = RunMeta.load(Path(run) / "meta.json").input_spec
    with load_compiled(Path(run), tgt) as runner:
        results = _measure_all(runner, (3, spec.height, spec.width),
                               batches or batch_sizes(tgt.batch.min, tgt.batch.opt, tgt.batch.max),
                               warmup=warmup, iterations=iterations, min_seconds=min_seconds)
        return BenchReport(subject=f"{run} ({tgt.name})", backend=tgt.backend, precision=runner.precision,
                           results=results, machine=_machine())
