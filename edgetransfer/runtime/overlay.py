"""An anomaly map drawn over the pixels it was computed on, for a person at the line to look at.

Pillow and numpy only (the device runtime has no matplotlib): the map is clipped to [0, 1] (0.5 is
the threshold, as in the score), coloured blue → green → yellow → red, and blended over the model's
view of the frame; the score and the decision are written in the corner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..fsutil import atomic_path

#: (position, RGB) stops of the colour scale; 0.5 (the threshold) is yellow-green, above it turns red
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 160], [0, 150, 255], [120, 230, 60], [255, 170, 0], [220, 0, 0]], dtype=np.float32)


def colourise(heat: np.ndarray) -> np.ndarray:
    """H×W map (threshold 0.5) → H×W×3 uint8 colours."""
    h = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=1.0), 0.0, 1.0)
    rgb = np.stack([np.interp(h, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def overlay(view: Image.Image, heat: np.ndarray, *, score: float, label: str, alpha: float = 0.45) -> Image.Image:
    """`view` (the model's input pixels) with `heat` blended over it and "label score" in the corner."""
    view = view.convert("RGB")
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != (view.height, view.width):
        raise ValueError(f"an anomaly map of {heat.shape} cannot lie over a {view.width}x{view.height} view")
    image = Image.blend(view, Image.fromarray(colourise(heat), "RGB"), alpha)
    draw = ImageDraw.Draw(image)
    text = f"{label} {score:.2f}"
    box = draw.textbbox((2, 1), text)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 80, 80) if score >= 0.5 else (255, 255, 255))
    return image


def write_overlay(image: Image.Image, path: Path) -> Path:
    """Written whole or not at all (a reader of the folder never sees half a PNG)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


__all__ = ["colourise", "overlay", "write_overlay"]
