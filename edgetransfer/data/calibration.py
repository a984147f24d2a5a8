"""Choosing the images that calibrate INT8 ranges — from train/val only, stratified, seeded, recorded.

Calibration that silently uses the wrong data (test images, one class, a handful of frames) is a
classic cause of INT8 accuracy that looks fine in the lab and fails on the line. So the selection
never sees the test split, balances classes, says which classes are thin, and writes down every file
with its sha256 so the calibration can be audited and reproduced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..fsutil import sha256_file
from ..targets import CalibrationPreset
from .folder import DatasetSplits, Sample

log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    samples: list[Sample]
    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _allocate(available: dict[int, int], total: int) -> dict[int, int]:
    """As equal a share per class as availability allows; leftover goes to classes that have more."""
    want = dict.fromkeys(available, 0)
    remaining = total
    open_classes = sorted(c for c, n in available.items() if n > 0)
    while remaining > 0 and open_classes:
        share = max(1, remaining // len(open_classes))
        for c in list(open_classes):
            take = min(share, available[c] - want[c], remaining)
            want[c] += take
            remaining -= take
            if want[c] >= available[c]:
                open_classes.remove(c)
            if remaining == 0:
                break
    return want


def select_calibration(splits: DatasetSplits, preset: CalibrationPreset) -> CalibrationSet:
    """Pick `preset.samples` images from the preset's splits (never test), balanced over classes."""
    if "test" in preset.splits:  # the schema forbids it; this guards hand-built presets too
        raise UsageError("calibration must not use the test split", field="calibration.splits")
    test_paths = {s.path.resolve() for s in splits.test}
    pool = [s for name in preset.splits for s in splits.split(name) if s.path.resolve() not in test_paths]
    by_class: dict[int, list[Sample]] = {i: [] for i in range(len(splits.classes))}
    for s in sorted(pool, key=lambda s: str(s.path)):
        by_class[s.label].append(s)
    plan = _allocate({c: len(v) for c, v in by_class.items()}, preset.samples)
    rng = np.random.default_rng(preset.seed)
    chosen: list[Sample] = []
    for c, items in by_class.items():
        if plan[c]:
            idx = rng.choice(len(items), size=plan[c], replace=False)
            chosen.extend(items[i] for i in sorted(idx))
    warnings = []
    if len(chosen) < preset.samples:
        warnings.append(f"only {len(chosen)} calibration images available in {'+'.join(preset.splits)} "
                        f"(preset {preset.name!r} asks for {preset.samples})")
    missing = [splits.classes[c] for c, n in plan.items() if n == 0]
    if missing:
        warnings.append(f"classes missing from the calibration set: {', '.join(missing)}")
    thin = [f"{splits.classes[c]} ({n})" for c, n in plan.items() if 0 < n < preset.min_per_class]
    if thin:
        warnings.append(f"classes with fewer than {preset.min_per_class} calibration images: {', '.join(thin)}")
    for w in warnings:
        log.warning("calibration: %s", w)
    root = Path(splits.root)
    record = {
        "preset": preset.name, "method": preset.method, "percentile": preset.percentile if preset.method == "percentile" else None,
        "seed": preset.seed, "splits": list(preset.splits), "requested": preset.samples, "count": len(chosen),
        "per_class": {splits.classes[c]: n for c, n in plan.items()}, "warnings": warnings,
        "files": [{"path": _rel(s.path, root), "class": splits.classes[s.label], "sha256": sha256_file(s.path)}
                  for s in chosen],
    }
    return CalibrationSet(samples=chosen, record=record, warnings=warnings)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)
