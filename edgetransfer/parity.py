"""Pure numpy comparison of two runners' outputs on the same inputs.

The comparator never knows which frameworks produced the logits: it sees two arrays, the labels and
the gates. A report holds one `PairReport` per pair and passes only when every pair passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .evidence import image_points, interval_text, paired_drop, wilson


@dataclass(frozen=True)
class Gates:
    """Thresholds for one pair; `None` disables a gate."""

    min_agreement: float | None = 1.0          # top-1 agreement, 0..1
    max_abs_diff: float | None = 1e-4          # on logits
    max_accuracy_drop: float | None = None     # percentage points, candidate vs reference
    min_cosine: float | None = None            # per-sample cosine similarity of logits


FP32_GATES = Gates(min_agreement=1.0, max_abs_diff=1e-4, max_accuracy_drop=0.0, min_cosine=0.999999)


@dataclass
class Side:
    name: str
    precision: str


@dataclass
class PairReport:
    pair: str
    reference: Side
    candidate: Side
    samples: int
    reference_accuracy: float | None
    candidate_accuracy: float | None
    accuracy_drop: float | None       # points
    agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    min_cosine: float
    gates: Gates
    failures: list[str] = field(default_factory=list)
    disagreement_confusion: list[list[int]] | None = None  # rows: reference prediction, cols: candidate
    advice: list[str] = field(default_factory=list)  # when a gate failed: what to try next (the caller's words)
    #: what the split resolves (`evidence`): a 95 % Wilson interval on the agreement, one image in
    #: points, and with labels the paired drop (images made worse / better, Newcombe interval, exact
    #: McNemar p). The gates judge the figures themselves; these say how much one image moves them.
    agreement_interval: tuple[float, float] = (0.0, 1.0)
    image_points: float | None = None
    drop_evidence: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["agreement_interval"] = [round(v, 6) for v in self.agreement_interval]
        # a non-finite candidate makes the diffs NaN/inf, which strict JSON cannot hold: write null
        # (the failure list says why) so that the report of exactly this failure can still be written
        for key in ("max_abs_diff", "mean_abs_diff", "min_cosine"):
            if not np.isfinite(d[key]):
                d[key] = None
        return d


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two output arrays (1.0 where a row is all zeros)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.where(denom > 0, (a64 * b64).sum(1) / np.maximum(denom, 1e-300), 1.0)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def compare(pair: str, reference: Side, candidate: Side, ref_logits: np.ndarray, cand_logits: np.ndarray,
            labels: np.ndarray | None, gates: Gates) -> PairReport:
    """Measure how far `candidate` is from `reference` and check the gates."""
    if ref_logits.shape != cand_logits.shape or ref_logits.ndim != 2:
        raise ValueError(f"{pair}: output shapes differ: {ref_logits.shape} vs {cand_logits.shape}")
    n, classes = ref_logits.shape
    ref_pred, cand_pred = ref_logits.argmax(1), cand_logits.argmax(1)
    diff = np.abs(ref_logits.astype(np.float64) - cand_logits.astype(np.float64))
    finite = bool(np.isfinite(cand_logits).all())
    ref_acc = cand_acc = drop = evidence = None
    if labels is not None and n:
        ref_acc = float((ref_pred == labels).mean())
        cand_acc = float((cand_pred == labels).mean())
        paired = paired_drop(ref_pred == labels, cand_pred == labels)
        drop, evidence = paired.drop, paired.to_dict()
    same = int((ref_pred == cand_pred).sum())
    report = PairReport(
        pair=pair, reference=reference, candidate=candidate, samples=n,
        reference_accuracy=ref_acc, candidate_accuracy=cand_acc, accuracy_drop=drop,
        agreement=float((ref_pred == cand_pred).mean()) if n else 1.0,
        max_abs_diff=float(diff.max()) if n else 0.0, mean_abs_diff=float(diff.mean()) if n else 0.0,
        min_cosine=float(cosines(ref_logits, cand_logits).min()) if n else 1.0, gates=gates,
        agreement_interval=wilson(same, n), image_points=image_points(n), drop_evidence=evidence)
    if not finite:
        report.failures.append("candidate produced non-finite outputs")
    if gates.min_agreement is not None and report.agreement < gates.min_agreement:
        report.failures.append(f"top-1 agreement {report.agreement:.4f} < {gates.min_agreement}")
    if gates.max_abs_diff is not None and report.max_abs_diff > gates.max_abs_diff:
        report.failures.append(f"max abs diff {report.max_abs_diff:.3g} > {gates.max_abs_diff:g}")
    if gates.max_accuracy_drop is not None and drop is not None and drop > gates.max_accuracy_drop + 1e-9:
        report.failures.append(f"accuracy drop {drop:.2f} points > {gates.max_accuracy_drop}")
    if gates.min_cosine is not None and report.min_cosine < gates.min_cosine:
        report.failures.append(f"min cosine {report.min_cosine:.6f} < {gates.min_cosine}")
    if report.agreement < 1.0:
        report.disagreement_confusion = confusion(ref_pred, cand_pred, classes).tolist()
    return report


@dataclass
class ParityReport:
    classes: list[str]
    pairs: list[PairReport]
    context: dict[str, Any] = field(default_factory=dict)  # run, data, spec: what was compared on what
    latency: dict[str, Any] | None = None  # of the deployed artifact, batch 1 (bench.Latency)
    summary: dict[str, Any] = field(default_factory=dict)  # the deployed artifact against torch fp32 and labels
    #: the reference model's accuracy next to chance and majority-class baselines (`baselines.assess`)
    baselines: dict[str, Any] | None = None
    #: things a person must read although no gate failed (e.g. a model no better than chance)
    warnings: list[str] = field(default_factory=list)
    #: the bytes this report is about: sha256 of every file of the compiled artifact (None without a target)
    artifact_files: dict[str, str] | None = None

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "warnings": list(self.warnings), "classes": self.classes,
                "context": self.context, "pairs": [p.to_dict() for p in self.pairs],
                "latency": self.latency, "summary": self.summary, "baselines": self.baselines,
                "artifact_files": self.artifact_files}

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        if self.warnings:
            verdict += f", {len(self.warnings)} WARNING{'S' if len(self.warnings) > 1 else ''}"
        lines = [f"# Parity report — {verdict}", ""]
        for w in self.warnings:
            lines += [f"> **WARNING:** {w}", ""]
        for key, value in self.context.items():
            lines.append(f"- **{key}**: {value}")
        lines += ["", "| pair | reference (precision) | candidate (precision) | samples | one image (pts) | ref acc | "
                      "cand acc | drop (pts) [95 %] | images worse / better | agreement [95 %] | max abs diff | "
                      "mean abs diff | min cosine | passed |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for p in self.pairs:
            ev = p.drop_evidence
            lines.append(
                f"| {p.pair} | {p.reference.name} ({p.reference.precision}) | {p.candidate.name} "
                f"({p.candidate.precision}) | {p.samples} | {_num(p.image_points, '.2f')} | "
                f"{_pct(p.reference_accuracy)} | {_pct(p.candidate_accuracy)} | {_num(p.accuracy_drop, '.2f')} "
                f"{'' if ev is None else interval_text(ev['interval'], '.2f')} | "
                f"{_changed(ev)} | {p.agreement:.4f} "
                f"{interval_text(p.agreement_interval)} | {p.max_abs_diff:.3g} | {p.mean_abs_diff:.3g} | "
                f"{p.min_cosine:.6f} | {'yes' if p.passed else '**NO**'} |")
        lines += ["", READING]
        for p in self.pairs:
            if p.failures:
                lines += ["", f"## {p.pair}: failed gates", *[f"- {f}" for f in p.failures]]
            if p.failures and p.advice:
                lines += ["", f"## {p.pair}: what to try next", *[f"{i}. {a}" for i, a in enumerate(p.advice, 1)]]
            if p.disagreement_confusion is not None:
                lines += ["", f"## {p.pair}: where predictions disagree",
                          "rows: reference prediction, columns: candidate prediction", "",
                          "| | " + " | ".join(self.classes) + " |", "|---" * (len(self.classes) + 1) + "|"]
                lines += [f"| **{c}** | " + " | ".join(str(v) for v in row) + " |"
                          for c, row in zip(self.classes, p.disagreement_confusion)]
        return "\n".join(lines) + "\n"


#: how to read the intervals, under every table (README "How to read a parity verdict")
READING = ("Intervals are 95 %: Wilson on agreement; Newcombe's paired interval on the accuracy drop, which "
           "only the images that changed inform (exact McNemar p in parity.json). A gate judges the measured "
           "figure; an interval that reaches across the gate means the verdict rests on a few images.")


def _changed(evidence: dict[str, Any] | None) -> str:
    return "—" if evidence is None else f"{evidence['worse']} / {evidence['better']}"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.2f}%"


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)
