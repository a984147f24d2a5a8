"""Where frames come from on the device: an image, a folder of images, a video file or a camera.

Images are decoded with Pillow (upright RGB). Video files and cameras go through OpenCV, imported
only when one is asked for (`pip install 'edgetransfer[video]'`); OpenCV hands out BGR frames, which
are passed on marked as BGR so the model's preprocessing puts the channels in the manifest's order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DependencyError, UsageError
from ..preprocess import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})


@dataclass
class SourceFrame:
    """One frame to predict on: a file path (images) or a BGR array (video, camera)."""

    source: str
    frame: int | None
    data: Path | np.ndarray
    color: str = "RGB"


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:
        raise DependencyError("video files and cameras need OpenCV: pip install 'edgetransfer[video]' "
                              f"(or opencv-python-headless) ({exc})") from exc
    return cv2


def _images(folder: Path) -> list[Path]:
    """The image files under `folder`. Symlinked images are read wherever they point (a camera's
    spool often links its frames); an image name that is not a readable file (a broken link, a FIFO)
    is skipped, and one line names what was."""
    files, skipped = [], []
    for p in folder.rglob("*"):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            (files if p.is_file() else skipped).append(p.relative_to(folder).as_posix())
    if skipped:
        skipped.sort()
        log.warning("skipped %d image name(s) in %s that are not readable files (broken links, FIFOs): %s",
                    len(skipped), folder, ", ".join(skipped[:10]) + (" …" if len(skipped) > 10 else ""))
    return [folder / name for name in sorted(files)]


def _capture(cap: Any, name: str, max_frames: int | None, every: int) -> Iterator[SourceFrame]:
    index = emitted = 0
    try:
        while max_frames is None or emitted < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            if index % every == 0:
                yield SourceFrame(source=name, frame=index, data=frame, color="BGR")
                emitted += 1
            index += 1
    finally:
        cap.release()


def iter_frames(source: str | Path, *, max_frames: int | None = None, every: int = 1) -> Iterator[SourceFrame]:
    """Frames of SOURCE: an image file, a folder (images in sorted order, recursively), a video
    file, or `camera:N` (OpenCV device N). `every` keeps one video frame in N; `max_frames` stops early."""
    if every < 1:
        raise UsageError("must be at least 1", field="every")
    text = str(source)
    if text.startswith("camera:"):
        index = text.removeprefix("camera:")
        if not index.isdigit():
            raise UsageError(f"camera source {text!r}: expected camera:N with N a device number", field="source")
        cv2 = _cv2()
        cap = cv2.VideoCapture(int(index))
        if not cap.isOpened():
            raise DependencyError(f"camera {index} cannot be opened here (no such device, or no permission)")
        yield from _capture(cap, text, max_frames, every)
        return
    path = Path(source)
    if not path.exists():
        raise UsageError("no such image, folder or video file", path=path)
    if path.is_dir():
        files = _images(path)
        if not files:
            raise UsageError("no images in this folder", path=path)
        for f in files[:max_frames]:
            yield SourceFrame(source=f.as_posix(), frame=None, data=f)
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        cv2 = _cv2()
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise UsageError("OpenCV cannot open this video file (codec or format not supported)", path=path)
        yield from _capture(cap, path.as_posix(), max_frames, every)
    else:
        yield SourceFrame(source=path.as_posix(), frame=None, data=path)
