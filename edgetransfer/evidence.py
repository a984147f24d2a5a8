"""What a split can resolve: intervals for the figures a parity verdict rests on.

A gate judged on a few hundred images is a measurement with an error bar. An agreement of 0.9967 on
300 images is one changed answer, and the same model on another 300 images (or on a CPU that rounds a
near-tie the other way) may read 0.9933 or 1.0. These helpers put the error bar next to the figure so
a reader sees whether a verdict rests on one image or on a margin:

- `wilson`: a 95 % Wilson score interval on a proportion (top-1 agreement, decision agreement).
  Wilson, not the normal approximation: it stays inside 0..1 and is honest at 0 or n successes,
  exactly where agreement figures live.
- `paired_drop`: the accuracy drop of a candidate against its reference *on the same images*, with
  Newcombe's (1998, method 10) interval for a paired difference of proportions and the exact
  McNemar test on the images that changed. Only the discordant images carry information about a
  drop; an unpaired interval would be several times wider and answer another question.
- `image_points`: how many accuracy points one image is on a split.

Pure Python: used by the workstation's parity reports and cheap enough to run anywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: two-sided 95 %
Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of `successes / n` (0..1). An empty sample says nothing: (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact ends where the estimate sits on them (rounding must not put 1.0 outside its own interval)
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def mcnemar_exact(worse: int, better: int) -> float:
    """Two-sided exact McNemar p-value: is `worse` (images the reference got right and the candidate
    wrong) different from `better` (the other way round) by more than chance? 1.0 when none changed."""
    changed = worse + better
    if changed == 0:
        return 1.0
    tail = sum(math.comb(changed, k) for k in range(min(worse, better) + 1))
    return min(1.0, 2.0 * tail / 2.0 ** changed)


@dataclass(frozen=True)
class PairedDrop:
    """The accuracy drop (points) of a candidate against its reference on the same images."""

    samples: int
    #: images the reference got right and the candidate wrong / the candidate right and the reference wrong
    worse: int
    better: int
    drop: float                 # points: 100 × (worse − better) / samples
    interval: tuple[float, float]  # 95 %, points (Newcombe's paired hybrid score interval)
    p_value: float              # exact McNemar test on the changed images
    image_points: float         # one image, in points

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interval"] = [round(v, 4) for v in self.interval]
        return d


def paired_drop(reference_correct: np.ndarray, candidate_correct: np.ndarray, z: float = Z95) -> PairedDrop:
    """Accuracy drop with a paired 95 % interval, from per-image correctness of both models."""
    ref, cand = np.asarray(reference_correct, bool), np.asarray(candidate_correct, bool)
    if ref.shape != cand.shape:
        raise ValueError(f"paired_drop needs the same images on both sides: {ref.shape} vs {cand.shape}")
    n = int(ref.size)
    both, worse = int((ref & cand).sum()), int((ref & ~cand).sum())
    better, neither = int((~ref & cand).sum()), int((~ref & ~cand).sum())
    if n == 0:
        return PairedDrop(0, 0, 0, 0.0, (-100.0, 100.0), 1.0, math.inf)
    p1, p2 = (both + worse) / n, (both + better) / n
    (l1, u1), (l2, u2) = wilson(both + worse, n, z), wilson(both + better, n, z)
    margins = (both + worse) * (better + neither) * (both + better) * (worse + neither)
    phi = 0.0 if margins == 0 else (both * neither - worse * better) / math.sqrt(margins)
    theta = p1 - p2
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return PairedDrop(samples=n, worse=worse, better=better, drop=round(100.0 * theta, 6),
                      interval=(100.0 * (theta - lower), 100.0 * (theta + upper)),
                      p_value=mcnemar_exact(worse, better), image_points=100.0 / n)


def image_points(samples: int) -> float | None:
    """One image, in accuracy points, on a split of `samples` images (None for an empty split)."""
    return 100.0 / samples if samples > 0 else None


def interval_text(interval: tuple[float, float] | list[float] | None, fmt: str = ".4f") -> str:
    """`[lo, hi]` for a table cell; an em dash when there is none."""
    if interval is None:
        return "—"
    return f"[{format(interval[0], fmt)}, {format(interval[1], fmt)}]"


__all__ = ["PairedDrop", "Z95", "image_points", "interval_text", "mcnemar_exact", "paired_drop", "wilson"]
