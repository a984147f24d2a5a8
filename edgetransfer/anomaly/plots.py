"""Pictures of scores: where good and defective parts fall for each side (one panel each, the threshold
drawn), and anomaly maps over the images they were computed on."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from ..plots import save_figure
from ..spec import InputSpec
from .metrics import NORMALISED_THRESHOLD, auroc

log = logging.getLogger(__name__)


def score_histograms(scores: dict[str, np.ndarray], anomalous: np.ndarray, path: Path) -> Path | None:
    """One histogram panel per side: good parts in green, defective in red, the threshold at 0.5."""
    if importlib.util.find_spec("matplotlib") is None:
        log.info("matplotlib not installed: %s not drawn", path)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(scores), 1, figsize=(7, 2.2 * len(scores)), sharex=True, squeeze=False)
    finite = np.concatenate([v[np.isfinite(v)] for v in scores.values()] or [np.zeros(1)])
    bins = np.linspace(0.0, max(float(finite.max(initial=1.0)), 1.0) * 1.02, 50)
    for ax, (name, s) in zip(axes[:, 0], scores.items()):
        ax.hist(s[~anomalous], bins=bins, color="tab:green", alpha=0.6, label=f"good ({(~anomalous).sum()})")
        ax.hist(s[anomalous], bins=bins, color="tab:red", alpha=0.6, label=f"defective ({anomalous.sum()})")
        ax.axvline(NORMALISED_THRESHOLD, color="k", lw=1, ls="--")
        ax.set_title(f"{name}: AUROC {auroc(s, anomalous):.4f}", fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("anomaly score (threshold 0.5)")
    fig.tight_layout()
    return save_figure(fig, path)


def pictures(x: np.ndarray, spec: InputSpec) -> list[np.ndarray]:
    """A preprocessed NCHW batch back to H×W×3 RGB images in 0..1 (what the model saw), to draw on."""
    mean, std = np.array(spec.mean)[:, None, None], np.array(spec.std)[:, None, None]
    views = [np.clip((xi * std + mean).transpose(1, 2, 0), 0, 1) for xi in x]
    return [v[..., ::-1] for v in views] if spec.color_order == "BGR" else views


def map_overlays(images: list[np.ndarray], maps: list[np.ndarray], titles: list[str], path: Path, *,
                 columns: int = 5) -> Path | None:
    """Each image (H×W×3, 0..1) with its anomaly map on top (0.5 = the threshold, clipped at 1)."""
    if importlib.util.find_spec("matplotlib") is None or not images:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(images), columns)
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, heat, title in zip(axes.ravel(), images, maps, titles):
        ax.imshow(image)
        ax.imshow(np.clip(heat, 0.0, 1.0), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["map_overlays", "pictures", "score_histograms"]
