"""Numbers for scores, not labels: AUROC, rank correlation and the decision threshold (pure numpy).

An anomaly model answers with a score per image; what a line cares about is how well the score
separates good from defective parts (AUROC, threshold-free) and which side of the threshold each
part falls on (the decision). Both are measured here the same way for torch, ONNX Runtime, OpenVINO
or TensorRT outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

#: the device-facing threshold: scores are divided so that the chosen threshold reads 0.5
NORMALISED_THRESHOLD = 0.5


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def auroc(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a defective part scores above a good one
    (ties count half), by the Mann–Whitney rank sum. NaN when one of the two groups is empty."""
    scores, anomalous = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(anomalous, dtype=bool).reshape(-1)
    n_pos, n_neg = int(anomalous.sum()), int((~anomalous).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    if not np.all(np.isfinite(scores)):
        return float("nan")
    rank_sum = _ranks(scores)[anomalous].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def finite_or_none(value: float) -> float | None:
    """A figure for JSON: NaN (AUROC with one kind of part missing) or inf becomes None."""
    return float(value) if np.isfinite(value) else None


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two score vectors (1.0: the same order). NaN for constant input."""
    ra, rb = _ranks(np.asarray(a).reshape(-1)), _ranks(np.asarray(b).reshape(-1))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


@dataclass(frozen=True)
class Threshold:
    """Where good ends and defective begins on the raw score, and how it was chosen."""

    raw: float
    method: Literal["best_f1", "good_quantile"]
    #: best_f1: the F1 on the validation images at this threshold; good_quantile: the quantile used
    value: float
    samples_good: int
    samples_anomalous: int

    @property
    def scale(self) -> float:
        """What raw scores are multiplied by so that this threshold reads `NORMALISED_THRESHOLD`."""
        return NORMALISED_THRESHOLD / self.raw

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "normalised": NORMALISED_THRESHOLD}


def choose_threshold(scores: np.ndarray, anomalous: np.ndarray, *, good_quantile: float = 0.99) -> Threshold:
    """The decision threshold on validation scores.

    With defective validation images: the threshold of best F1 (defective = positive), placed midway
    between the two scores it separates so that a small numeric change does not flip a validation
    image. With only good images: the `good_quantile` of their scores (a false-alarm rate of about
    1 − quantile on good parts), the only choice that needs no defects.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    anomalous = np.asarray(anomalous, dtype=bool).reshape(-1)
    if len(scores) == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("threshold needs finite validation scores")
    good, bad = int((~anomalous).sum()), int(anomalous.sum())
    if bad == 0 or good == 0:
        if good == 0:
            raise ValueError("threshold needs good validation images")
        raw = float(np.quantile(scores[~anomalous], good_quantile))
        return Threshold(raw=max(raw, 1e-12), method="good_quantile", value=good_quantile,
                         samples_good=good, samples_anomalous=bad)
    values = np.unique(scores)
    cuts = np.r_[(values[:-1] + values[1:]) / 2.0, values[-1] + 1e-6] if len(values) > 1 else values + 1e-6
    best_f1, best_cut = -1.0, float(cuts[0])
    for cut in cuts:
        predicted = scores >= cut
        tp = int((predicted & anomalous).sum())
        fp = int((predicted & ~anomalous).sum())
        fn = bad - tp
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 > best_f1:
            best_f1, best_cut = f1, float(cut)
    return Threshold(raw=max(best_cut, 1e-12), method="best_f1", value=round(best_f1, 6),
                     samples_good=good, samples_anomalous=bad)


__all__ = ["NORMALISED_THRESHOLD", "Threshold", "auroc", "choose_threshold", "finite_or_none", "spearman"]
