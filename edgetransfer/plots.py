"""Pictures for people: logit parity scatter plots and confusion matrices.

matplotlib is optional (the `train` extra brings it); without it the reports are still written,
only the PNG is skipped, with a log line saying so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .fsutil import atomic_path
from .parity import ParityReport, confusion

log = logging.getLogger(__name__)


def parity_figure(report: ParityReport, pairs: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray,
                  predictions: np.ndarray, path: Path) -> Path | None:
    """One scatter of reference vs candidate logits per pair, then the deployed model's confusion matrix."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: %s not drawn", path)
        return None
    panels = len(pairs) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.2), squeeze=False)
    for ax, (name, (ref, cand)) in zip(axes[0], pairs.items()):
        ax.scatter(ref.ravel(), cand.ravel(), s=4, alpha=0.5)
        lo, hi = float(min(ref.min(), cand.min())), float(max(ref.max(), cand.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
        entry = next((p for p in report.pairs if p.pair == name), None)
        subtitle = f"\nmax |Δ| {entry.max_abs_diff:.2g}, agreement {entry.agreement:.3f}" if entry else ""
        ax.set_title(name + subtitle, fontsize=9)
        ax.set_xlabel("reference logit")
        ax.set_ylabel("candidate logit")
    ax = axes[0][-1]
    m = confusion(labels, predictions, len(report.classes))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(report.classes)), report.classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(report.classes)), report.classes, fontsize=8)
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > m.max() / 2 else "black")
    ax.set_title(f"deployed model vs labels (accuracy {np.trace(m) / max(1, m.sum()):.3f})", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
