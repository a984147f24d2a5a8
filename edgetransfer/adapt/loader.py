"""Torch datasets over scanned samples, and the order in which the processes of a run read them.

Images are decoded once and kept resized to the spec's resize size, so epochs pay for augmentation
only. Evaluation tensors come from `preprocess.preprocess` — the very function the device runtime
uses — so a validation score during training is a score on deployment preprocessing.

Randomness is a function of (seed, epoch, sample), never of which process or DataLoader worker
handles a sample: the shuffle of epoch e and the augmentation of sample i in epoch e are the same on
one CPU, with 8 workers on a GPU, in rank 3 of a distributed run, and after `--resume`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.folder import Sample
from ..errors import UsageError
from ..preprocess import load_image, normalize, preprocess, resize_and_crop
from ..spec import InputSpec


def _shrink(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Downscale so the shorter side is the spec's resize size; never upscale (augmentation may)."""
    w, h = img.size
    scale = spec.resize_size / min(w, h)
    if scale >= 1:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (distinct tuples give distinct seeds in practice)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Augmentation:
    """How training views are drawn; every choice must keep the label true.

    `crop_scale=None` keeps the deployment geometry (`resize_and_crop` with the run's own spec): a
    random crop can cut a defect at the border out of the image and so teach a wrong label. Flips
    and 90° rotations are label-preserving for surfaces, which have no canonical orientation.
    `brightness`/`contrast`/`saturation` are ColorJitter strengths (0: off).
    """

    flips: bool = True
    rot90: bool = True
    crop_scale: tuple[float, float] | None = None
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: named presets (`train --augment NAME`); "surface" is the default for inspection images
AUGMENTATIONS: dict[str, Augmentation] = {
    "surface": Augmentation(),
    "natural": Augmentation(rot90=False, crop_scale=(0.6, 1.0), brightness=0.2, contrast=0.2, saturation=0.1),
    "none": Augmentation(flips=False, rot90=False, brightness=0.0, contrast=0.0),
}


_QUARTER_TURNS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def augmentation(name: str) -> Augmentation:
    if name not in AUGMENTATIONS:
        raise UsageError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}", field="augment")
    return AUGMENTATIONS[name]


class AugmentedImages(Dataset):
    """Training views of the images: see `Augmentation` for what may change.

    Items are addressed by `(epoch, index)` keys (see `GlobalBatchSampler`) and return
    `(image, label, index)`: the augmentation is seeded from (seed, epoch, index) inside whichever
    process draws it, and the index lets the trainer record which samples each process trained on.
    """

    def __init__(self, samples: Sequence[Sample], spec: InputSpec, *, seed: int = 0,
                 augment: Augmentation = AUGMENTATIONS["surface"]):
        from torchvision.transforms import v2

        self.samples = list(samples)
        self.spec = spec
        self.seed = seed
        self.aug = augment
        steps: list[Any] = []
        if augment.crop_scale is not None:  # natural images: views of 60-100 % of the area
            self.images = [_shrink(load_image(s.path), spec) for s in self.samples]
            steps.append(v2.RandomResizedCrop((spec.height, spec.width), scale=augment.crop_scale, antialias=True))
        else:  # the deployment geometry, computed once: the borders stay in every view
            self.images = [resize_and_crop(load_image(s.path), spec) for s in self.samples]
        if augment.flips:
            steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if augment.brightness or augment.contrast or augment.saturation:
            steps.append(v2.ColorJitter(brightness=augment.brightness, contrast=augment.contrast,
                                        saturation=augment.saturation))
        self.augment = v2.Compose(steps)
        self.rot90 = augment.rot90 and spec.height == spec.width  # a quarter turn must keep the input's shape

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        epoch, i = key
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG (dropout) alone
            torch.manual_seed(mix_seed(self.seed, epoch, i))
            img = self.augment(self.images[i])
            if self.rot90 and (turns := int(torch.randint(0, 4, ()))):
                img = img.transpose(_QUARTER_TURNS[turns - 1])
        return torch.from_numpy(normalize(img, self.spec)), self.samples[i].label, i


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


class GlobalBatchSampler:
    """This process's part of each global batch of one epoch (a DataLoader `batch_sampler`).

    Epoch e shuffles all n samples with a generator seeded by (seed, e) — the same permutation in
    every process — and cuts it into global batches of `batch_size`; rank r of `world_size` takes the
    r-th of `world_size` near-equal slices of each. With DistributedDataParallel averaging gradients,
    N processes therefore take the very steps one process takes at the same `batch_size` (up to
    BatchNorm, which normalises over the local slice). `set_epoch` picks the epoch; the sampler
    runs in the main process, so it works with persistent DataLoader workers.

    A last global batch too small to give every process two samples is dropped: BatchNorm cannot
    normalise a single sample in training mode.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, keyed: bool = False):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size, self.keyed = rank, world_size, keyed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batch_sizes(self) -> list[int]:
        """The size of every global batch of an epoch (the same in every epoch)."""
        sizes = [min(self.batch_size, self.n - start) for start in range(0, self.n, self.batch_size)]
        if self.shuffle and len(sizes) > 1 and sizes[-1] < 2 * self.world_size:
            sizes.pop()
        return sizes

    def __len__(self) -> int:
        return len(self.global_batch_sizes())

    def __iter__(self) -> Iterator[list]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch)))
        else:
            order = torch.arange(self.n)
        start = 0
        for size in self.global_batch_sizes():
            lo = start + self.rank * size // self.world_size
            hi = start + (self.rank + 1) * size // self.world_size
            start += size
            idx = order[lo:hi].tolist()
            yield [(self.epoch, i) for i in idx] if self.keyed else idx


def rank_shard(n: int, rank: int, world_size: int) -> list[int]:
    """The samples rank r evaluates or embeds: every world_size-th from r; no padding, no overlap."""
    return list(range(rank, n, world_size))
