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
    fig = draw_parity_figure(report, pairs, labels, predictions)
    if fig is None:
        log.info("matplotlib not installed: %s not drawn", path)
        return None
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")  # nothing clipped at the edges
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
