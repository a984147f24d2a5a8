"""Torch datasets over scanned samples.

Images are decoded once and kept resized to the spec's resize size, so epochs pay for augmentation
only. Evaluation tensors come from `preprocess.preprocess` — the very function the device runtime
uses — so a validation score during training is a score on deployment preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.folder import Sample
from ..preprocess import load_image, normalize, preprocess
from ..spec import InputSpec


def _shrink(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Downscale so the shorter side is the spec's resize size; never upscale (augmentation may)."""
    w, h = img.size
    scale = spec.resize_size / min(w, h)
    if scale >= 1:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)


class AugmentedImages(Dataset):
    """Training views: random crop of 60-100% of the area, flips, light photometric jitter.

    Surfaces have no canonical orientation, so both flips are label-preserving.
    """

    def __init__(self, samples: Sequence[Sample], spec: InputSpec):
        from torchvision.transforms import v2

        self.samples = list(samples)
        self.spec = spec
        self.images = [_shrink(load_image(s.path), spec) for s in self.samples]
        self.augment = v2.Compose([
            v2.RandomResizedCrop((spec.height, spec.width), scale=(0.6, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1),
        ])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.augment(self.images[i])
        return torch.from_numpy(normalize(img, self.spec)), self.samples[i].label


class EvalImages(Dataset):
    """Evaluation views: exactly the deployment preprocessing, decoded lazily."""

    def __init__(self, samples: Sequence[Sample], spec: InputSpec):
        self.samples = list(samples)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.samples[i]
        return torch.from_numpy(preprocess(load_image(s.path), self.spec)), s.label
