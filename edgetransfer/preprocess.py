"""Image decoding and the evaluation preprocessing, in numpy and Pillow only.

Training (for its validation passes), export checks, validation and the torch-free device runtime all
call these two functions, so the pixels a deployed model sees are produced by the same code that
produced them during training.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import DataError
from .spec import InputSpec

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB, upright.

    EXIF orientation is applied (phones and some cameras store rotated pixels); 16- and 32-bit
    greyscale is scaled to 8 bits rather than clipped to white; palette and alpha images lose their
    alpha channel the same way on every machine.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 257.0  # 0..65535 -> 0..255 (mode "I" from a 16-bit PNG uses the same range)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
"""File suffixes taken as images (compared lower-cased); other files in class folders are ignored."""

#: images larger than this are refused from their header, before decoding: a few-KB PNG can claim
#: 50,000 x 50,000 pixels (a decompression bomb) and would need gigabytes to decode. 64 MP is above
#: every industrial camera's frame; Pillow's own limit (178 MP) would still decode 0.5 GB per image.
MAX_PIXELS = 64_000_000


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file fully (so truncation is found here, not mid-epoch) as upright RGB."""
    try:
        with warnings.catch_warnings():  # Pillow warns above 89 MP; the cap below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(f"image is {img.width}x{img.height} pixels, over the {MAX_PIXELS // 1_000_000} MP "
                                "limit (a decompression bomb, or not a camera frame); refused before decoding",
                                path=path)
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image: {exc}", path=path) from exc


def resize_and_crop(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Geometric part of the spec: PIL image in, PIL image of exactly height x width out."""
    resample = _RESAMPLE[spec.interpolation]
    if spec.resize_mode == "stretch":
        return img.resize((spec.width, spec.height), resample)
    if spec.resize_mode == "letterbox":
        return _letterbox(img, spec, resample)
    w, h = img.size
    short, long_ = (w, h) if w <= h else (h, w)
    new_short = spec.resize_size
    new_long = int(new_short * long_ / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    left = int(round((new_w - spec.width) / 2.0))
    top = int(round((new_h - spec.height) / 2.0))
    return img.crop((left, top, left + spec.width, top + spec.height))


def _letterbox(img: Image.Image, spec: InputSpec, resample: Image.Resampling) -> Image.Image:
    """The whole image, aspect kept, centred on a canvas of the mean colour (0 after normalisation)."""
    w, h = img.size
    scale = min(spec.width / w, spec.height / h)
    new_w, new_h = max(1, min(spec.width, round(w * scale))), max(1, min(spec.height, round(h * scale)))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    if (new_w, new_h) == (spec.width, spec.height):
        return img
    mean = spec.mean[::-1] if spec.color_order == "BGR" else spec.mean  # the mean is in the model's order
    canvas = Image.new("RGB", (spec.width, spec.height), tuple(round(255 * m) for m in mean))
    canvas.paste(img, ((spec.width - new_w) // 2, (spec.height - new_h) // 2))
    return canvas


def normalize(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """RGB PIL image of the input size -> float32 CHW array, channels in the spec's order."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if spec.color_order == "BGR":
        arr = arr[..., ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def preprocess(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """The whole evaluation preprocessing: decoded RGB image -> model input (C, H, W)."""
    return normalize(resize_and_crop(to_rgb(img), spec), spec)
