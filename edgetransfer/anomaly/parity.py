"""Parity for scores: the same pairs as a classifier's, judged by what a score is used for.

A pair compares two runners' scores on the same held-out images: how well each separates good from
defective parts (AUROC, and the drop in points), whether each part falls on the same side of the
threshold (decision agreement), whether the order of the parts is kept (Spearman), and how far the
scores move relative to the threshold. The target profile's gates mean here:

| gate (profile field) | on scores |
|---|---|
| `max_accuracy_drop` | AUROC drop, points |
| `min_agreement` | decision agreement (the same side of the threshold) |
| `min_cosine` | Spearman rank correlation of the scores |
| `max_abs_diff` | max \\|Δscore\\| relative to the threshold |

Like `parity.compare`, nothing here knows which framework produced the scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..evidence import image_points, interval_text, wilson
from ..parity import READING, Gates, ParityReport, Side
from .metrics import NORMALISED_THRESHOLD, auroc, finite_or_none, spearman


@dataclass
class ScorePairReport:
    pair: str
    reference: Side
    candidate: Side
    samples: int
    reference_auroc: float | None
    candidate_auroc: float | None
    auroc_drop: float | None            # points
    decision_agreement: float
    score_spearman: float | None
    max_abs_diff_rel: float             # max |Δscore| / threshold
    mean_abs_diff_rel: float
    gates: Gates
    failures: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    #: what the split resolves: a 95 % Wilson interval on the decision agreement and one image's share
    #: of it in points (`evidence`); the gates judge the figures themselves
    agreement_interval: tuple[float, float] = (0.0, 1.0)
    image_points: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def agreement(self) -> float:
        """What a classifier's pair calls agreement: here, the same side of the threshold."""
        return self.decision_agreement

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["agreement_interval"] = [round(v, 6) for v in self.agreement_interval]
        for key in ("max_abs_diff_rel", "mean_abs_diff_rel", "score_spearman"):
            if d[key] is not None and not np.isfinite(d[key]):
                d[key] = None
        return d


def compare_scores(pair: str, reference: Side, candidate: Side, ref: np.ndarray, cand: np.ndarray,
                   anomalous: np.ndarray | None, gates: Gates) -> ScorePairReport:
    """Measure how far `candidate`'s scores are from `reference`'s and check the gates."""
    ref, cand = np.asarray(ref, np.float64).reshape(-1), np.asarray(cand, np.float64).reshape(-1)
    if ref.shape != cand.shape:
        raise ValueError(f"score shapes differ: {ref.shape} vs {cand.shape}")
    finite = bool(np.all(np.isfinite(cand)))
    ref_auc = cand_auc = drop = None
    if anomalous is not None:
        ref_auc, cand_auc = finite_or_none(auroc(ref, anomalous)), finite_or_none(auroc(cand, anomalous))
        if ref_auc is not None and cand_auc is not None:
            drop = (ref_auc - cand_auc) * 100.0
    diff = np.abs(ref - cand) / NORMALISED_THRESHOLD
    same = int(((ref >= NORMALISED_THRESHOLD) == (cand >= NORMALISED_THRESHOLD)).sum())
    report = ScorePairReport(
        pair=pair, reference=reference, candidate=candidate, samples=int(len(ref)), reference_auroc=ref_auc,
        candidate_auroc=cand_auc, auroc_drop=drop,
        decision_agreement=same / len(ref) if len(ref) else 1.0,
        agreement_interval=wilson(same, len(ref)), image_points=image_points(len(ref)),
        score_spearman=finite_or_none(spearman(ref, cand)) if finite else None,
        max_abs_diff_rel=float(diff.max()) if len(diff) else 0.0,
        mean_abs_diff_rel=float(diff.mean()) if len(diff) else 0.0, gates=gates)
    if not finite:
        report.failures.append("the candidate produced NaN or infinite scores")
    if gates.min_agreement is not None and report.decision_agreement < gates.min_agreement - 1e-12:
        report.failures.append(f"decision agreement {report.decision_agreement:.4f} < {gates.min_agreement}")
    if gates.max_accuracy_drop is not None and (drop is None or drop > gates.max_accuracy_drop + 1e-9):
        report.failures.append("AUROC drop cannot be measured (one of good/defective is missing)" if drop is None
                               else f"AUROC drop {drop:.2f} points > {gates.max_accuracy_drop}")
    if gates.min_cosine is not None and (report.score_spearman is None or report.score_spearman < gates.min_cosine):
        report.failures.append(f"score rank correlation {report.score_spearman} < {gates.min_cosine}")
    if gates.max_abs_diff is not None and not report.max_abs_diff_rel <= gates.max_abs_diff:
        report.failures.append(f"max |Δscore| / threshold {report.max_abs_diff_rel:.3g} > {gates.max_abs_diff}")
    return report


@dataclass
class ScoreParityReport(ParityReport):
    """`ParityReport`'s shape (parity.json, `passed`, artifact hashes) with score pairs."""

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"# Parity report (anomaly scores) — {verdict}", ""]
        lines += [f"> **WARNING:** {w}\n" for w in self.warnings]
        lines += [f"- **{key}**: {value}" for key, value in self.context.items()]
        lines += ["", "Scores are normalised: the threshold is 0.5. Gates: AUROC drop (`max_accuracy_drop`), "
                      "decision agreement (`min_agreement`), rank correlation (`min_cosine`), max |Δscore| / "
                      "threshold (`max_abs_diff`).", "",
                  "| pair | reference (precision) | candidate (precision) | samples | one image (pts) | ref AUROC | "
                  "cand AUROC | drop (pts) | decision agreement [95 %] | Spearman | max \\|Δ\\|/thr | "
                  "mean \\|Δ\\|/thr | passed |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for p in self.pairs:
            lines.append(
                f"| {p.pair} | {p.reference.name} ({p.reference.precision}) | {p.candidate.name} "
                f"({p.candidate.precision}) | {p.samples} | {_f(p.image_points, '.2f')} | "
                f"{_f(p.reference_auroc, '.4f')} | {_f(p.candidate_auroc, '.4f')} | {_f(p.auroc_drop, '.2f')} | "
                f"{p.decision_agreement:.4f} {interval_text(p.agreement_interval)} | "
                f"{_f(p.score_spearman, '.5f')} | {p.max_abs_diff_rel:.3g} | {p.mean_abs_diff_rel:.3g} | "
                f"{'yes' if p.passed else '**NO**'} |")
        lines += ["", READING]
        per_type = (self.summary or {}).get("auroc_per_type")
        if per_type:
            lines += ["", "## AUROC per defect type (deployed model vs torch fp32)", "",
                      "| defect type | torch fp32 | deployed |", "|---|---:|---:|"]
            lines += [f"| {name} | {row['reference']:.4f} | {row['deployed']:.4f} |" for name, row in per_type.items()]
        for p in self.pairs:
            if p.failures:
                lines += ["", f"## {p.pair}: failed gates", *[f"- {f}" for f in p.failures]]
            if p.failures and p.advice:
                lines += ["", f"## {p.pair}: what to try next", *[f"{i}. {a}" for i, a in enumerate(p.advice, 1)]]
        return "\n".join(lines) + "\n"


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


__all__ = ["ScoreParityReport", "ScorePairReport", "compare_scores"]
