"""Pictures for people: logit parity scatter plots and confusion matrices.

matplotlib is optional (the `train` extra brings it); without it the reports are still written,
only the PNG is skipped, with a log line saying so.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from .fsutil import atomic_path
from .parity import ParityReport, confusion

log = logging.getLogger(__name__)


def parity_figure(report: ParityReport, pairs: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray,
                  predictions: np.ndarray, path: Path) -> Path | None:
    """One scatter of reference vs candidate logits per pair, then the deployed model's confusion matrix."""
    return save_figure(draw_parity_figure(report, pairs, labels, predictions), path)


def save_figure(fig: Any, path: Path) -> Path | None:
    """Write `fig` as a PNG atomically (nothing clipped at the edges) and close it; None (logged) when
    there is no figure because matplotlib is not installed."""
    if fig is None:
        log.info("matplotlib not installed: %s not drawn", path)
        return None
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def flipped(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Indices of the samples whose top-1 prediction differs between reference and candidate."""
    return np.flatnonzero(ref.argmax(1) != cand.argmax(1))


def draw_parity_figure(report: ParityReport, pairs: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray,
                       predictions: np.ndarray) -> Any:
    """The figure `parity_figure` saves (a matplotlib Figure; None without matplotlib).

    Each scatter panel draws every logit of every image; the images whose top-1 prediction flipped
    are drawn again on top, larger and in red, and the legend counts them ("N of M predictions
    flipped"): near-tied logits flip while sitting on the diagonal, so without the marking a failed
    agreement gate would be invisible.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = len(pairs) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.8), squeeze=False, layout="constrained")
    for ax, (name, (ref, cand)) in zip(axes[0], pairs.items()):
        moved = flipped(ref, cand)
        kept = np.setdiff1d(np.arange(len(ref)), moved)
        ax.scatter(ref[kept].ravel(), cand[kept].ravel(), s=6, alpha=0.45, color="tab:blue", linewidths=0,
                   label=f"{len(kept)} of {len(ref)} predictions agree", zorder=2)
        ax.scatter(ref[moved].ravel(), cand[moved].ravel(), s=36, marker="x", color="tab:red", linewidths=1.4,
                   label=f"{len(moved)} of {len(ref)} predictions flipped", zorder=3, gid="flipped")
        lo, hi = float(min(ref.min(), cand.min())), float(max(ref.max(), cand.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, zorder=1)
        entry = next((p for p in report.pairs if p.pair == name), None)
        title = textwrap.fill(name, 46)
        if entry:
            title += (f"\nmax |Δ| {entry.max_abs_diff:.2g}, agreement {entry.agreement:.3f}"
                      + ("" if entry.passed else " — FAILED"))
        ax.set_title(title, fontsize=9, color="black" if entry is None or entry.passed else "tab:red")
        ax.set_xlabel("reference logit (every class of every image)")
        ax.set_ylabel("candidate logit")
        ax.legend(loc="upper left", fontsize=8, markerscale=1.2, framealpha=0.9)
    ax = axes[0][-1]
    m = confusion(labels, predictions, len(report.classes))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(report.classes)), report.classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(report.classes)), report.classes, fontsize=8)
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > m.max() / 2 else "black")
    chance = f", chance {report.baselines['chance']:.3f}" if report.baselines else ""
    ax.set_title(f"deployed model vs labels\n(accuracy {np.trace(m) / max(1, m.sum()):.3f}{chance})"
                 + ("\nWARNING: no better than the baselines" if report.warnings else ""), fontsize=9,
                 color="tab:red" if report.warnings else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return fig


def select_figure(result: Any, path: Path) -> Path | None:
    """`select`'s picture: predicted accuracy against measured latency, the Pareto front highlighted."""
    return save_figure(draw_select_figure(result), path)


def draw_select_figure(result: Any) -> Any:
    """Each candidate a point (predicted accuracy ± one standard error vs batch-1 p50 latency on the
    target); the Pareto front joined and filled, the others grey, the recommendation starred, the
    budget a dashed line. Without any latency measured here (TensorRT off its device), predicted
    accuracy against input size, one line per backbone. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cands = result.candidates
    rec = result.recommended
    fig, ax = plt.subplots(figsize=(7.2, 4.8), layout="constrained")
    timed = [c for c in cands if c.latency_ms is not None]
    if timed:
        others = [c for c in timed if not c.on_front]
        front = sorted((c for c in timed if c.on_front), key=lambda c: c.latency_ms)
        if others:
            ax.errorbar([c.latency_ms for c in others], [c.predicted_accuracy for c in others],
                        yerr=[c.standard_error for c in others], fmt="o", color="tab:gray", alpha=0.7,
                        markersize=6, capsize=2, label="dominated")
        ax.errorbar([c.latency_ms for c in front], [c.predicted_accuracy for c in front],
                    yerr=[c.standard_error for c in front], fmt="o-", color="tab:blue", markersize=8, capsize=2,
                    linewidth=1.5, label="Pareto front", gid="front")
        for c in timed:
            ax.annotate(f"{c.backbone.removeprefix('efficientnet_')} @ {c.size}", (c.latency_ms, c.predicted_accuracy),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
        if rec is not None and rec.latency_ms is not None:
            ax.plot([rec.latency_ms], [rec.predicted_accuracy], marker="*", markersize=18, color="tab:orange",
                    linestyle="none", label=f"recommended: {rec.label}", zorder=5)
        if result.latency_budget_ms is not None:
            ax.axvline(result.latency_budget_ms, color="tab:red", linestyle="--", linewidth=1,
                       label=f"budget {result.latency_budget_ms:g} ms")
        ax.set_xlabel(f"latency on {result.target}, batch 1 p50 (ms, measured here)")
    else:
        for name in dict.fromkeys(c.backbone for c in cands):
            mine = sorted((c for c in cands if c.backbone == name), key=lambda c: c.size)
            ax.errorbar([c.size for c in mine], [c.predicted_accuracy for c in mine],
                        yerr=[c.standard_error for c in mine], fmt="o-", capsize=2, label=name)
        if rec is not None:
            ax.plot([rec.size], [rec.predicted_accuracy], marker="*", markersize=18, color="tab:orange",
                    linestyle="none", label=f"recommended: {rec.label}", zorder=5)
        ax.set_xlabel(f"input size (px); latency not measured here ({result.target} runs {result.backend} "
                      "on its device)")
    ax.set_ylabel("predicted accuracy (linear probe, CV)")
    ax.set_title(f"backbone selection for {result.target}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig
