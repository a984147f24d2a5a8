"""A registry facade over torchvision (and timm, when installed) classification models.

One name → one factory; weights come from the torch hub cache, a local file, an edgetransfer
checkpoint, or nowhere; the classifier head is replaced for the new class list. The preprocessing
that belongs to a set of weights (mean, std, resize rule) is returned with them, so it can travel as
data next to the weights instead of being re-typed by hand.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import DependencyError, IntegrityError, UsageError
from .spec import InputSpec, RunMeta
from .tensorfile import check_finite, load_torch_weights, read_safetensors

log = logging.getLogger(__name__)

# Families whose forward returns auxiliary outputs while training; they need their own training loop.
_EXCLUDED = {"googlenet": "auxiliary classifiers", "inception_v3": "auxiliary classifiers"}
_STAGE_CONTAINERS = ("features", "layers", "trunk_output", "blocks", "stages", "encoder.layers")
_TOP_LEVEL_STAGE = re.compile(r"(layer|stage)\d+")


@dataclass(frozen=True)
class Head:
    """Where the classifier lives: `path` is replaced for new classes; its input is the embedding.

    `flatten` is true where the model flattens after the head (squeezenet's head is a 1x1 conv).
    """

    path: str
    flatten: bool = False


@dataclass
class Backbone:
    """A created model plus what later stages need to know about it."""

    name: str
    model: nn.Module
    head: Head
    weights: str
    input_spec: InputSpec
    source_classes: list[str] | None = None  # set when weights came from an edgetransfer checkpoint


def _torchvision_names() -> list[str]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if n not in _EXCLUDED]


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return [f"timm/{n}" for n in timm.list_models()]


def list_backbones(*, include_timm: bool = True) -> list[str]:
    """Every name `create` accepts: torchvision's classifiers, plus `timm/<name>` when timm is installed."""
    return _torchvision_names() + (_timm_names() if include_timm else [])


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def find_head(model: nn.Module) -> Head:
    """The last Linear layer is the head for every torchvision classifier except squeezenet's conv."""
    if hasattr(model, "get_classifier") and hasattr(model, "reset_classifier"):  # timm
        for name, module in model.named_modules():
            if module is model.get_classifier():
                return Head(name)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return Head(linears[-1])
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[-1].startswith("classifier"):
        return Head("classifier", flatten=True)
    raise UsageError(f"cannot find the classifier head of {type(model).__name__}")


def replace_head(model: nn.Module, head: Head, num_classes: int) -> None:
    """Swap the classifier for one with `num_classes` outputs, keeping its input width."""
    if hasattr(model, "reset_classifier"):  # timm knows its own heads
        model.reset_classifier(num_classes)
        return
    old = model.get_submodule(head.path)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes)
        _set_submodule(model, head.path, new)
        return
    # squeezenet: classifier = Dropout, Conv2d(512, C, 1), ReLU, AdaptiveAvgPool2d
    conv_idx = [i for i, m in enumerate(old) if isinstance(m, nn.Conv2d)][-1]
    conv = old[conv_idx]
    old[conv_idx] = nn.Conv2d(conv.in_channels, num_classes, kernel_size=1)


def stages(model: nn.Module, head: Head) -> list[nn.Module]:
    """The backbone's stages in forward order, for "unfreeze the last N stages"."""
    for path in _STAGE_CONTAINERS:
        try:
            container = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container) > 1:
            return list(container)
    top = [m for n, m in model.named_children() if _TOP_LEVEL_STAGE.fullmatch(n)]
    if top:
        return top
    return [m for n, m in model.named_children() if n != head.path.split(".")[0] and any(True for _ in m.parameters())]


def _weights_enum(name: str, weights: str) -> Any:
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"backbone {name!r} has no published weights", field="weights") from exc
    if weights == "default":
        return enum.DEFAULT
    try:
        return enum[weights]
    except KeyError as exc:
        options = ", ".join(w.name for w in enum)
        raise UsageError(f"unknown weights {weights!r} for {name}; choose one of: default, none, {options}, or a file path",
                         field="weights") from exc


def hub_weights_file(weights_enum: Any) -> Path:
    """Where torchvision looks for (and would download) this weights file: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights_enum.url).path).name


def _spec_from_weights(weights_enum: Any, img_size: int) -> InputSpec:
    t = weights_enum.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    return InputSpec(height=img_size, width=img_size, resize_size=max(img_size, round(img_size * resize / crop)),
                     mean=tuple(t.mean), std=tuple(t.std), interpolation=t.interpolation.value)


def _load_hub_state_dict(weights_enum: Any) -> dict[str, torch.Tensor]:
    target = hub_weights_file(weights_enum)
    try:
        return weights_enum.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; no network ends here
        raise UsageError(
            f"pretrained weights {weights_enum} are not in the torch hub cache and could not be downloaded ({exc}). "
            f"Copy {Path(urlparse(weights_enum.url).path).name} (from {weights_enum.url}) to {target}, "
            f"or set TORCH_HOME so that this path holds it, or use --weights none / a local file.",
            path=target, field="weights") from exc


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], RunMeta | None]:
    """A state dict from safetensors, a weights-only .pth, or an edgetransfer run/checkpoint folder."""
    meta: RunMeta | None = None
    if path.is_dir():
        meta = RunMeta.load(path / "meta.json")
        path = path / "model.safetensors"
    if not path.exists():
        raise UsageError("weights file not found", path=path, field="weights")
    if path.suffix == ".safetensors":
        return read_safetensors(path), meta
    obj = load_torch_weights(path)  # weights_only: a pickle that would run code is refused, exit 4
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise IntegrityError("expected a dict of tensors", path=path)
    check_finite(obj, path)
    return obj, meta


def load_backbone_weights(model: nn.Module, head: Head, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load everything but the head strictly; a missing, unexpected or mis-shaped key is an error."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    head_prefix = head.path + "."
    missing = sorted(k for k in own if k not in state and not k.startswith(head_prefix))
    unexpected = sorted(k for k in state if k not in own and not k.startswith(head_prefix))
    mismatched = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in state if k in own and state[k].shape != own[k].shape and not k.startswith(head_prefix))
    if missing or unexpected or mismatched:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        parts = [f"{label} {len(keys)}: {show(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]
        raise UsageError("weights do not fit this backbone — " + "; ".join(parts), path=source, field="weights")
    body = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    heads = {k: v for k, v in state.items() if k.startswith(head_prefix)}
    if heads and all(k in own and own[k].shape == v.shape for k, v in heads.items()):
        body.update(heads)
    else:
        log.info("head of %s not loaded: it is replaced for the new classes", source)
    model.load_state_dict(body, strict=False)


def create(name: str, num_classes: int, *, weights: str = "none", img_size: int = 224) -> Backbone:
    """Build `name` with a `num_classes` head and the requested weights.

    `weights`: "none" (random init), "default" or a torchvision weights name such as "IMAGENET1K_V1"
    (read from the torch hub cache, downloaded only where there is network), or a path to a
    safetensors / .pth state dict or an edgetransfer run folder.
    """
    if num_classes < 2:
        raise UsageError(f"a classifier needs at least 2 classes, got {num_classes}", field="classes")
    if name in _EXCLUDED:
        raise UsageError(f"{name} is not supported ({_EXCLUDED[name]})", field="backbone")
    spec = InputSpec.square(img_size)
    source_classes: list[str] | None = None
    if name.startswith("timm/"):
        model = _create_timm(name.removeprefix("timm/"), weights)
    else:
        import torchvision

        if name not in _torchvision_names():
            raise UsageError(f"unknown backbone {name!r}; `edgetransfer backbones` lists them", field="backbone")
        model = torchvision.models.get_model(name, weights=None)
        if weights not in ("none", "") and not _looks_like_path(weights):
            enum = _weights_enum(name, weights)
            model.load_state_dict(_load_hub_state_dict(enum))
            spec = _spec_from_weights(enum, img_size)
            weights = f"{enum.__class__.__name__}.{enum.name}"
    head = find_head(model)
    replace_head(model, head, num_classes)
    if _looks_like_path(weights):
        path = Path(weights)
        state, meta = read_state_dict(path)
        if meta is not None:
            if meta.backbone != name:
                raise UsageError(f"checkpoint was trained with backbone {meta.backbone!r}, not {name!r}",
                                 path=path, field="backbone")
            # the checkpoint's normalisation travels with its weights; only the size is the caller's
            ratio = meta.input_spec.resize_size / meta.input_spec.height
            spec = InputSpec(**{**meta.input_spec.to_dict(), "height": img_size, "width": img_size,
                                "resize_size": max(img_size, round(img_size * ratio))})
            source_classes = list(meta.classes)
        load_backbone_weights(model, head, state, source=str(path))
        weights = str(path)
    return Backbone(name=name, model=model, head=head, weights=weights, input_spec=spec, source_classes=source_classes)


def _looks_like_path(weights: str) -> bool:
    if weights in ("none", "", "default"):  # keywords, even where a folder of that name exists in the cwd
        return False
    return "/" in weights or "\\" in weights or weights.endswith((".pth", ".pt", ".safetensors")) or Path(weights).exists()


def _create_timm(name: str, weights: str) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise DependencyError("timm backbones need timm: pip install timm") from exc
    if weights not in ("none", "", "default") and not _looks_like_path(weights):
        raise UsageError("timm backbones take --weights default, none or a file path", field="weights")
    try:
        return timm.create_model(name, pretrained=weights == "default")
    except RuntimeError as exc:
        raise UsageError(f"timm could not create {name!r}: {exc}", field="backbone") from exc

