"""PatchCore (Roth et al., 2022) as one torch module that exports to one ONNX graph.

Mid-level features of an ImageNet backbone, averaged over a small neighbourhood so that each patch
sees its surroundings, are compared with a memory bank of patches from good parts only. A patch far
from every good patch is anomalous; the image score is the largest patch distance. No gradient, no
defect labels: fitting is one forward pass over the good images and a coreset selection.

Three choices measured on the synthetic surfaces (README, "Defects from good parts only"): each
image's features are centred on their own mean (removes lighting and tint, which otherwise dominate
the distance), the input is reflect-padded before the backbone and the padded cells cut off (zero
padding inside the network makes border patches look unlike any good patch), and the score ignores
the outermost `ignore_border` cells of the map (the map itself covers the whole image).

Everything the device runs is in `PatchCoreScorer.forward`, written with ops every target compiles:
the distances to the bank are ‖p‖² − 2·p·Bᵀ + ‖b‖² (one MatMul, no Python loop), the minimum over
the bank is a ReduceMin, the map is resized to the input and smoothed by a separable Gaussian (two
convolutions), and the score is the map's maximum. Scores and map are scaled so that the decision
threshold reads 0.5 (`metrics.NORMALISED_THRESHOLD`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UsageError


@dataclass(frozen=True)
class PatchCoreConfig:
    """How an anomaly run is fitted. Sizes are checked up front (`problems`), before any image is read."""

    backbone: str = "efficientnet_lite0"
    weights: str = "default"
    img_size: int = 160
    resize: str = "crop"
    #: backbone stages whose outputs are the patch features (timm EfficientNet `blocks[i]`)
    layers: tuple[int, ...] = (3, 4)
    #: reflect padding of the input, in pixels, cut off the feature maps again
    pad: int = 16
    #: subtract each image's mean feature (per channel, over the map)
    centre: bool = True
    #: map cells at the edge that the image score ignores (the map covers every cell)
    ignore_border: int = 1
    #: also fit on each good image turned by 90° (square inputs): surfaces have no up
    rot90: bool = True
    #: side of the neighbourhood each patch feature is averaged over (PatchCore's local aggregation)
    neighbourhood: int = 3
    #: patches kept in the memory bank (greedy k-center coreset of every good patch)
    bank_size: int = 2000
    #: the bank the device holds must fit this (the fit's patch pool is bounded separately)
    max_bank_mb: float = 64.0
    #: the pool of good patches the coreset is chosen from, in memory during the fit
    max_pool_mb: float = 2048.0
    #: dimensions the coreset selection works in (a random projection; the bank keeps full features)
    coreset_dims: int = 64
    #: Gaussian smoothing of the anomaly map, in input pixels (PatchCore: 4)
    sigma: float = 4.0
    #: the good class (train folder); "ok", or "good" when there is no "ok"
    good: str = "ok"
    #: threshold without defective validation images: this quantile of the good validation scores
    good_quantile: float = 0.99
    batch_size: int = 32
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if not 8 <= self.img_size <= 4096:
            out.append(f"img_size: {self.img_size} is outside 8..4096")
        if not self.layers or any(not 0 <= i <= 6 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            out.append(f"layers: {list(self.layers)} must be distinct stage indices 0..6")
        if not 0 <= self.pad <= 256:
            out.append(f"pad: {self.pad} must be within 0..256 pixels")
        if not 0 <= self.ignore_border <= 16:
            out.append(f"ignore_border: {self.ignore_border} must be within 0..16 cells")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            out.append(f"neighbourhood: {self.neighbourhood} must be an odd number ≥ 1")
        if self.bank_size < 1:
            out.append(f"bank_size: {self.bank_size} must be ≥ 1")
        if not (self.max_bank_mb > 0 and math.isfinite(self.max_bank_mb)):
            out.append(f"max_bank_mb: {self.max_bank_mb} must be a positive number")
        if not (self.max_pool_mb > 0 and math.isfinite(self.max_pool_mb)):
            out.append(f"max_pool_mb: {self.max_pool_mb} must be a positive number")
        if self.coreset_dims < 1:
            out.append(f"coreset_dims: {self.coreset_dims} must be ≥ 1")
        if not (0 <= self.sigma <= 64 and math.isfinite(self.sigma)):
            out.append(f"sigma: {self.sigma} must be within 0..64")
        if not 0.5 <= self.good_quantile <= 1.0:
            out.append(f"good_quantile: {self.good_quantile} must be within 0.5..1")
        if self.batch_size < 1:
            out.append(f"batch_size: {self.batch_size} must be ≥ 1")
        return out


class PatchFeatures(nn.Module):
    """The backbone up to its deepest used stage on the reflect-padded input; each used stage's output
    without the padded cells, averaged over a neighbourhood and resized to the first one's grid,
    concatenated along channels and (`centre`) centred on the image's own mean."""

    def __init__(self, model: nn.Module, layers: Sequence[int], neighbourhood: int, *, pad: int = 0,
                 centre: bool = False):
        super().__init__()
        if not all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks")):
            raise UsageError(f"anomaly features need an EfficientNet-style backbone (conv_stem, bn1, blocks); "
                             f"{type(model).__name__} has none", field="backbone")
        self.layers = tuple(sorted(layers))
        self.stem = nn.Sequential(model.conv_stem, model.bn1)
        self.blocks = nn.Sequential(*list(model.blocks)[:self.layers[-1] + 1])
        self.neighbourhood, self.pad, self.centre = neighbourhood, pad, centre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, mode="reflect")
        x = self.stem(x)
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.layers:
                cut = self.pad * x.shape[-1] // (width + 2 * self.pad)  # the padded cells at this stride
                outs.append(x[..., cut:x.shape[-2] - cut, cut:x.shape[-1] - cut] if cut else x)
        k = self.neighbourhood
        if k > 1:
            outs = [F.avg_pool2d(o, k, stride=1, padding=k // 2, count_include_pad=False) for o in outs]
        size = outs[0].shape[-2:]
        outs = [outs[0], *(F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:])]
        f = torch.cat(outs, 1)
        return f - f.mean(dim=(2, 3), keepdim=True) if self.centre else f


def gaussian_taps(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian, radius 4σ rounded up (PatchCore's smoothing); [1.0] for σ = 0."""
    if sigma <= 0:
        return torch.ones(1)
    radius = max(1, int(math.ceil(4 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (t / sigma) ** 2)
    return (taps / taps.sum()).float()


class PatchCoreScorer(nn.Module):
    """(N, 3, H, W) → score (N,), anomaly map (N, H, W); both divided by the threshold and × 0.5."""

    def __init__(self, features: PatchFeatures, bank: torch.Tensor, *, input_size: tuple[int, int],
                 sigma: float, ignore_border: int = 0, scale: float = 1.0):
        super().__init__()
        self.features = features
        self.input_size = tuple(input_size)
        self.ignore_border = ignore_border
        self.register_buffer("bank_t", bank.t().contiguous())            # (D, M)
        self.register_buffer("bank_sq", (bank.double() ** 2).sum(1).float())  # (M,)
        taps = gaussian_taps(sigma)
        self.register_buffer("taps_h", taps.view(1, 1, 1, -1).clone())
        self.register_buffer("taps_v", taps.view(1, 1, -1, 1).clone())
        self.register_buffer("scale", torch.tensor(float(scale)))

    def patch_distances(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, h, w): each patch's distance to its nearest bank patch."""
        f = self.features(x)
        _, c, h, w = f.shape
        p = f.permute(0, 2, 3, 1).reshape(-1, c)
        # pow, not p * p: one input edge per node (NNCF cannot place quantizers on a node reading one tensor twice)
        d2 = p.pow(2).sum(1, keepdim=True) - 2.0 * torch.matmul(p, self.bank_t) + self.bank_sq
        return d2.amin(1).clamp_min(0.0).sqrt().reshape(-1, 1, h, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.patch_distances(x)
        b = self.ignore_border
        inner = d[..., b:d.shape[-2] - b, b:d.shape[-1] - b] if b else d
        score = inner.amax(dim=(1, 2, 3)) * self.scale
        m = F.interpolate(d, size=self.input_size, mode="bilinear", align_corners=False)
        r = self.taps_h.shape[-1] // 2
        if r:  # the picture only: the score is the raw cells' maximum
            m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), self.taps_h)
            m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), self.taps_v)
        return score, m[:, 0] * self.scale


def greedy_coreset(patches: torch.Tensor, k: int, *, dims: int, seed: int) -> torch.Tensor:
    """Indices of `k` patches chosen by greedy k-center (each next one the farthest from those chosen),
    as PatchCore does it: in a random projection to `dims` dimensions (Johnson–Lindenstrauss keeps the
    distances), updating every patch's distance to the chosen set in one vector operation per pick."""
    n = patches.shape[0]
    if k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    x = patches
    if patches.shape[1] > dims:
        x = patches @ (torch.randn(patches.shape[1], dims, generator=g) / math.sqrt(dims))
    x = x.contiguous()
    sq = (x * x).sum(1)
    threads = torch.get_num_threads()
    # thousands of small memory-bound steps: one thread is faster than several (measured on 2 cores:
    # 500 picks of 40,000 patches took 0.43 s on one thread, 10.8 s on two with other work running)
    torch.set_num_threads(1)
    try:
        return _greedy(x, sq, k, n, g)
    finally:
        torch.set_num_threads(threads)


def _greedy(x: torch.Tensor, sq: torch.Tensor, k: int, n: int, g: torch.Generator) -> torch.Tensor:
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=g))
    nearest = (sq - 2.0 * (x @ x[chosen[0]]) + sq[chosen[0]]).clamp_min(0.0)
    for i in range(1, k):
        chosen[i] = int(torch.argmax(nearest))
        torch.minimum(nearest, (sq - 2.0 * (x @ x[chosen[i]]) + sq[chosen[i]]).clamp_min(0.0), out=nearest)
    return chosen


__all__ = ["PatchCoreConfig", "PatchCoreScorer", "PatchFeatures", "gaussian_taps", "greedy_coreset"]
