"""A registry facade over torchvision (and timm, when installed) classification models.

One name → one factory; weights come from the torch hub cache, a local file, an edgetransfer
checkpoint, or nowhere; the classifier head is replaced for the new class list. The preprocessing
that belongs to a set of weights (mean, std, resize rule) is returned with them, so it can travel as
data next to the weights instead of being re-typed by hand.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import DependencyError, IntegrityError, UsageError
from . import weight_sources
from .spec import InputSpec, ResizeMode, RunMeta
from .weight_sources import Normalization
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
    spec_source: str = ""  # where the normalisation came from (recorded in the run's meta)


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
    """Every name `create` accepts: the packaged-weights backbones, torchvision's classifiers, plus
    `timm/<name>` when timm is installed."""
    packaged = [s.backbone for s in weight_sources.packaged_sources()]
    return packaged + _torchvision_names() + (_timm_names() if include_timm else [])


def check_name(name: str, *, field: str = "backbone") -> None:
    """Exit 2 with a did-you-mean unless `create` knows `name` (a packaged or torchvision backbone, or
    `timm/<name>` when timm is installed): callers that build several backbones check every name first."""
    import difflib

    if name.startswith("timm/"):
        try:
            import timm
        except ImportError as exc:
            raise DependencyError(f"{name} is a timm backbone: pip install timm") from exc
        bare = name.removeprefix("timm/")
        if timm.is_model(bare):
            return
        close = [f"timm/{c}" for c in difflib.get_close_matches(bare, timm.list_models(), n=1)]
    else:
        known = list_backbones(include_timm=False)
        if name in known:
            return
        close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UsageError(f"unknown backbone {name!r}; {hint}`edgetransfer backbones` lists them", field=field)


def offline_weights(name: str) -> tuple[str, str]:
    """(status, detail) of `name`'s default weights on this machine, without loading them:
    status is "yes" (found offline), "no" (where they would be and how to get them) or "none"."""
    if (source := weight_sources.packaged(name)) is not None:
        path = source.locate()
        return ("yes", f"{source.tag}: {path}") if path else ("no", source.pip_command)
    if name.startswith("timm/"):
        return "none", "timm: pretrained weights come from a hub (not offline); use --weights PATH"
    try:
        enum = _weights_enum(name, "default")
    except UsageError:
        return "none", "no published weights"
    path = hub_weights_file(enum)
    return ("yes", f"{enum.name}: {path}") if path.exists() else ("no", f"copy {path.name} to {path}")


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


def _norm_from_torchvision(weights_enum: Any) -> tuple[Normalization, float]:
    """Mean, std and interpolation from torchvision's own transforms for these weights, and their crop ratio."""
    t = weights_enum.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    return Normalization(mean=tuple(t.mean), std=tuple(t.std), interpolation=t.interpolation.value,
                         native_size=crop), crop / resize


def _norm_from_timm(model: nn.Module) -> tuple[Normalization, float] | None:
    """timm's pretrained config for the architecture: what its published weights were trained with."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        return None
    interpolation = cfg.get("interpolation", "bilinear")
    size = cfg.get("input_size", (3, 224, 224))[-1]
    return Normalization(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                         interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear",
                         native_size=size), float(cfg.get("crop_pct", 0.875))


def read_normalization_sidecar(weights: Path) -> Normalization | None:
    """`<weights file>.json` next to a weights file: {"mean": [3], "std": [3], "interpolation": "..."}.

    How a file states the preprocessing it was trained with, so that nobody has to remember it.
    """
    sidecar = weights.with_name(weights.name + ".json")
    if not sidecar.is_file():
        return None
    try:
        d = json.loads(sidecar.read_bytes()[:65536].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"not valid JSON ({exc})", path=sidecar) from exc
    if not isinstance(d, dict):
        raise UsageError("expected a JSON object", path=sidecar)
    unknown = sorted(set(d) - {"mean", "std", "interpolation"})
    if unknown or "mean" not in d or "std" not in d:
        raise UsageError(f"expected keys mean, std and optionally interpolation; got {sorted(d)}", path=sidecar,
                         field=unknown[0] if unknown else "mean")
    try:
        norm = Normalization(mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                             interpolation=str(d.get("interpolation", "bilinear")))
        InputSpec(mean=norm.mean, std=norm.std, interpolation=norm.interpolation)  # the spec's own checks
    except (TypeError, ValueError) as exc:
        raise UsageError(f"malformed normalisation: {exc}", path=sidecar, field="mean") from exc
    except UsageError as exc:
        raise UsageError(str(exc), path=sidecar, field=exc.field) from exc
    return norm


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


def create(name: str, num_classes: int, *, weights: str = "none", img_size: int = 224,
           resize: ResizeMode = "shorter_center_crop", normalization: Normalization | None = None) -> Backbone:
    """Build `name` with a `num_classes` head and the requested weights.

    `weights`: "none" (random init); "default" or a named set: torchvision's (e.g. "IMAGENET1K_V1",
    from the torch hub cache) or a packaged source's (e.g. "IMAGENET1K" for efficientnet_lite0,
    from its installed package); or a path to a safetensors / .pth state dict or an edgetransfer run.

    The normalisation always comes from the weights: torchvision's transforms for its weights, timm's
    pretrained config, the pinned record of a packaged source, a run's own meta, or the sidecar
    `<file>.json` of a weights file; `normalization` (the CLI's --mean/--std) overrides all of them.
    `Backbone.spec_source` says which one was used. `resize` is the geometric policy (a training choice).
    """
    if num_classes < 2:
        raise UsageError(f"a classifier needs at least 2 classes, got {num_classes}", field="classes")
    if name in _EXCLUDED:
        raise UsageError(f"{name} is not supported ({_EXCLUDED[name]})", field="backbone")
    norm, crop_ratio, norm_source = _IMAGENET, 0.875, "ImageNet statistics (no pretrained weights named them)"
    source_classes: list[str] | None = None
    is_path = _looks_like_path(weights)
    if (source := weight_sources.packaged(name)) is not None:
        model = _timm_model(source.architecture)
        norm, norm_source = source.normalization, f"pinned record of {source.label}"
        crop_ratio = 0.875
        if weights not in ("none", "") and not is_path:
            source = weight_sources.resolve(name, weights)
            model.load_state_dict(source.load(model))
            weights = f"{source.backbone}.{source.tag}"
    elif name.startswith("timm/"):
        model = _create_timm(name.removeprefix("timm/"), weights)
        if (from_timm := _norm_from_timm(model)) is not None:
            (norm, crop_ratio), norm_source = from_timm, f"timm pretrained config of {name.removeprefix('timm/')}"
    else:
        import torchvision

        check_name(name)
        model = torchvision.models.get_model(name, weights=None)
        if weights not in ("none", "") and not is_path:
            enum = _weights_enum(name, weights)
            model.load_state_dict(_load_hub_state_dict(enum))
            norm, crop_ratio = _norm_from_torchvision(enum)
            weights = f"{enum.__class__.__name__}.{enum.name}"
            norm_source = f"torchvision transforms of {weights}"
        elif is_path:
            try:
                norm, crop_ratio = _norm_from_torchvision(_weights_enum(name, "default"))
                norm_source = f"torchvision transforms of {name}'s default weights"
            except UsageError:
                pass
    head = find_head(model)
    replace_head(model, head, num_classes)
    if is_path:
        path = Path(weights)
        state, meta = read_state_dict(path)
        if meta is not None:
            if meta.backbone != name:
                raise UsageError(f"checkpoint was trained with backbone {meta.backbone!r}, not {name!r}",
                                 path=path, field="backbone")
            # the checkpoint's normalisation travels with its weights; only the size is the caller's
            s = meta.input_spec
            norm = Normalization(mean=s.mean, std=s.std, interpolation=s.interpolation, native_size=s.height)
            crop_ratio = s.height / s.resize_size if s.resize_mode == "shorter_center_crop" else crop_ratio
            norm_source = f"the input spec of run {path}"
            source_classes = list(meta.classes)
        elif (stated := read_normalization_sidecar(path)) is not None:
            norm, norm_source = stated, f"sidecar {path.name}.json"
        else:
            norm_source += f" (assumed for {path.name}: state it with --mean/--std or {path.name}.json)"
            log.warning("normalisation for %s: %s", path, norm_source)
        load_backbone_weights(model, head, state, source=str(path))
        weights = str(path)
    if normalization is not None:
        norm, norm_source = normalization, "--mean/--std given by the user"
    spec = InputSpec(height=img_size, width=img_size, resize_mode=resize, interpolation=norm.interpolation,
                     resize_size=max(img_size, round(img_size / crop_ratio)) if resize == "shorter_center_crop"
                     else img_size, mean=norm.mean, std=norm.std)
    return Backbone(name=name, model=model, head=head, weights=weights, input_spec=spec,
                    source_classes=source_classes, spec_source=norm_source)


_IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _looks_like_path(weights: str) -> bool:
    if weights in ("none", "", "default"):  # keywords, even where a folder of that name exists in the cwd
        return False
    return "/" in weights or "\\" in weights or weights.endswith((".pth", ".pt", ".safetensors")) or Path(weights).exists()


def _timm_model(architecture: str) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise DependencyError("this backbone is built by timm: pip install timm (or 'edgetransfer[weights]')") from exc
    return timm.create_model(architecture, pretrained=False)


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
