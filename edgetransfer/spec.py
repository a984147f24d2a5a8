"""The contract that travels with every artifact: the input spec, the class list and the run meta.

One `InputSpec` and one ordered class list are fixed at training time and copied unchanged into the
checkpoint meta, the ONNX metadata and every later artifact, so that no stage ever re-derives the
preprocessing (the commonest reason a deployed model "loses accuracy").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .errors import IntegrityError, UsageError
from .fsutil import write_json

SCHEMA_VERSION = 1

ResizeMode = Literal["shorter_center_crop", "stretch", "letterbox"]
_RESIZE_MODES = ("shorter_center_crop", "stretch", "letterbox")
#: the CLI's short names for the resize policies
RESIZE_POLICIES: dict[str, ResizeMode] = {"crop": "shorter_center_crop", "stretch": "stretch", "letterbox": "letterbox"}
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
TASKS = ("classification", "anomaly")
#: an anomaly scorer's outputs, in graph order (`Runner.infer` hands back the first)
ANOMALY_OUTPUTS = ("score", "anomaly_map")


def anomaly_outputs(outputs: dict[str, Any]) -> tuple[Any, Any | None]:
    """(scores, maps) from a runner's `infer_outputs`: by the export's names where the backend kept
    them, else by position (the export's order); maps is None from a backend that returned one output."""
    values = list(outputs.values())
    return (outputs.get(ANOMALY_OUTPUTS[0], values[0]),
            outputs.get(ANOMALY_OUTPUTS[1], values[1] if len(values) > 1 else None))


@dataclass(frozen=True)
class InputSpec:
    """How raw pixels become the model's input tensor.

    `resize_mode="shorter_center_crop"` resizes the shorter side to `resize_size` and crops the centre
    `height` x `width` (torchvision's evaluation rule: it cuts off the borders, where inspection images
    often have their defects); `"stretch"` resizes straight to the input size (every pixel kept, aspect
    changed); `"letterbox"` fits the whole image inside the input keeping its aspect and pads the rest
    with the mean colour (zero after normalisation). `resize_size` matters only for the crop.
    Pixel values are scaled to [0, 1], then `(x - mean) / std` per channel, in `color_order`.
    """

    height: int = 224
    width: int = 224
    resize_size: int = 256
    resize_mode: ResizeMode = "shorter_center_crop"
    interpolation: str = "bilinear"
    color_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    dtype: Literal["float32"] = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.height < 8 or self.width < 8:
            raise UsageError(f"input size {self.height}x{self.width} is too small (minimum 8)", field="input_spec.height")
        if self.resize_mode not in _RESIZE_MODES:
            raise UsageError(f"unknown resize_mode {self.resize_mode!r}; expected one of {_RESIZE_MODES}", field="input_spec.resize_mode")
        if self.interpolation not in _INTERPOLATIONS:
            raise UsageError(f"unknown interpolation {self.interpolation!r}", field="input_spec.interpolation")
        if self.resize_mode == "shorter_center_crop" and self.resize_size < max(self.height, self.width):
            raise UsageError("resize_size must be at least the crop size", field="input_spec.resize_size")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise UsageError("mean and std need three values, std positive", field="input_spec.std")

    @classmethod
    def square(cls, size: int, *, crop_ratio: float = 0.875, **kw: Any) -> InputSpec:
        """The usual evaluation rule for a square input: resize to size/0.875, centre crop `size`."""
        return cls(height=size, width=size, resize_size=round(size / crop_ratio), **kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str | Path | None = None) -> InputSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown input_spec keys {unknown}", path=source, field="input_spec")
        try:
            return cls(**d)
        except TypeError as exc:
            raise UsageError(f"malformed input_spec: {exc}", path=source, field="input_spec") from exc


@dataclass
class RunMeta:
    """What a checkpoint says about itself: enough to rebuild, export and validate it."""

    classes: list[str]
    input_spec: InputSpec
    backbone: str
    weights: str
    mode: str
    data: dict[str, Any] = field(default_factory=dict)  # root, hash, split record
    metrics: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    #: sha256 of model.safetensors, written with it: a flipped bit or a swapped file is caught on load
    weights_sha256: str | None = None
    #: where the input spec's normalisation came from (the weights' config, a sidecar, the user's flags)
    spec_source: str | None = None
    #: "classification" (logits over `classes`) or "anomaly" (a score per image, fitted on the good class
    #: `anomaly["good"]` of `classes`; every other class counts as defective)
    task: str = "classification"
    #: an anomaly run's scorer: its configuration, the threshold and how it was set, the bank's size
    anomaly: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_spec"] = self.input_spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str | Path | None = None) -> RunMeta:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise IntegrityError(
                f"meta schema_version {version!r} is not {SCHEMA_VERSION}; this edgetransfer cannot read it",
                path=source, field="schema_version")
        for key in ("classes", "input_spec", "backbone", "weights", "mode"):
            if key not in d:
                raise IntegrityError("missing required key", path=source, field=key)
        classes = d["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise IntegrityError("classes must be a non-empty list of names", path=source, field="classes")
        if d.get("task", "classification") not in TASKS:
            raise IntegrityError(f"unknown task {d.get('task')!r}; this edgetransfer knows {list(TASKS)}",
                                 path=source, field="task")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["input_spec"] = InputSpec.from_dict(d["input_spec"], source=source)
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RunMeta:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise UsageError("no such file; is this a training run folder?", path=path) from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"not valid JSON ({exc})", path=path) from exc
        if not isinstance(d, dict):
            raise IntegrityError("expected a JSON object", path=path)
        return cls.from_dict(d, source=path)
