"""Target profiles and calibration presets: small frozen dataclasses loaded strictly from YAML.

A profile names everything that differs between devices — backend, device, precision, batch range,
quantization scheme, parity gates — so that the stages stay device-agnostic. Profiles live in the
checkout's top-level `targets/` and presets in `calibration/`; setup.py maps both into the wheel, so an
installed edgetransfer lists the same names. A path to a user's own YAML file works wherever a name does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from .errors import UsageError
from .parity import Gates
from .schema import from_dict, read_yaml

Precision = Literal["fp32", "fp16", "int8"]


@dataclass(frozen=True)
class BatchRange:
    min: int = 1
    opt: int = 1
    max: int = 8

    def problems(self) -> list[str]:
        if self.min < 1 or self.opt < self.min or self.max < self.opt:  # (not `not a <= b`: see schema._Invalid)
            return [f"min/opt/max: need 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}"]
        return []


@dataclass(frozen=True)
class Quantization:
    """How INT8 is produced: who quantizes, with which scheme, calibrated how, within which budget."""

    quantizer: Literal["auto", "onnxruntime", "nncf"] = "auto"
    activations: Literal["symmetric", "asymmetric"] = "asymmetric"
    weights: Literal["per_channel", "per_tensor"] = "per_channel"
    # 7-bit weights: x86 CPUs without VNNI multiply u8 x s8 pairs with a saturating 16-bit add, so
    # full-range INT8 weights overflow there and the runtime drifts from the QDQ model it was given
    reduce_range: bool = False
    # int32: biases become int32 DequantizeLinear inputs (ONNX Runtime and OpenVINO fold them into the
    # integer kernels); float: biases stay float, which TensorRT needs (its DequantizeLinear takes INT8 only)
    bias: Literal["int32", "float"] = "int32"
    # op types whose inputs stay float (not quantized); the op then adds dequantized values in fp32
    # and only its output is quantized for the next layer. OpenVINO executes a residual Add whose two
    # inputs are int8 with an extra rounding of one branch (one element in six one step off on the
    # demo model), so the intel-cpu profile leaves Add in float (README "Which quantizer each target uses")
    float_ops: tuple[Literal["Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "MaxPool"], ...] = ()
    calibration: str = "default"            # a preset name (calibration/*.yaml) or a path
    max_drop: float = 0.5                   # accuracy budget in points on the validation split
    fallback: bool = True                   # keep the most sensitive layers in fp32 until within budget
    max_fallback_layers: int = 8
    # The margin the search aims past the gates, because another CPU rounds INT8 differently and the
    # test images sit closer to the class boundaries than the images the search may look at (train
    # images are fitted: on the demo their smallest top-2 logit gap is 0.43, on test 0.05).
    # `agreement_margin`: the share of the gate's allowed disagreement left unused (0.5 with a 0.99
    # gate: aim at 0.995). `aim_min_cosine`: the worst per-image logit cosine with fp32 to reach on
    # those images (a classifier's; 0 disables). Missing the aim is not a failure, only the gates are.
    agreement_margin: float = 0.5
    aim_min_cosine: float = 0.98

    def problems(self) -> list[str]:
        out = []
        if self.max_drop < 0:
            out.append("max_drop: must be >= 0")
        if self.max_fallback_layers < 0:
            out.append("max_fallback_layers: must be >= 0")
        if not 0.0 <= self.agreement_margin < 1.0:
            out.append("agreement_margin: must be within [0, 1)")
        if not 0.0 <= self.aim_min_cosine <= 1.0:
            out.append("aim_min_cosine: must be within [0, 1]")
        return out


@dataclass(frozen=True)
class GateSpec:
    """Parity gates for one pair; null disables a gate."""

    min_agreement: float | None = None
    max_abs_diff: float | None = None
    max_accuracy_drop: float | None = None
    min_cosine: float | None = None

    def problems(self) -> list[str]:
        out = []
        for name in ("min_agreement", "min_cosine"):
            v = getattr(self, name)
            if v is not None and (v < 0.0 or v > 1.0):
                out.append(f"{name}: must be within [0, 1], got {v}")
        for name in ("max_abs_diff", "max_accuracy_drop"):
            v = getattr(self, name)
            if v is not None and v < 0:
                out.append(f"{name}: must be >= 0, got {v}")
        return out

    def gates(self) -> Gates:
        return Gates(min_agreement=self.min_agreement, max_abs_diff=self.max_abs_diff,
                     max_accuracy_drop=self.max_accuracy_drop, min_cosine=self.min_cosine)


@dataclass(frozen=True)
class ParityGates:
    """The pairs of DESIGN.md: fp32 export fidelity, quantization effect, compiler fidelity."""

    export: GateSpec = GateSpec(min_agreement=1.0, max_abs_diff=1e-4)
    quantization: GateSpec = GateSpec(min_agreement=0.99, max_accuracy_drop=0.5)
    compiler: GateSpec = GateSpec(min_agreement=0.995)


@dataclass(frozen=True)
class TensorRTSpec:
    """What a TensorRT target's device runs: an engine is specific to these, so they are checked twice —
    when the engine is built (this machine must be that device) and when it is loaded (its sidecar
    must match the machine)."""

    jetpack: str
    tensorrt: str                            # major.minor: picks the ONNX operator table and opset range
    compute_capability: str                  # "8.7" for Orin
    gpu: str                                 # human-readable; the engine sidecar records the exact name
    dla_cores: int = 0                       # how many the device has
    use_dla: bool = False                    # build for a DLA core (GPU fallback for what DLA can't run)
    dla_core: int = 0
    workspace_mb: int = 1024
    # precision policy for layers the QDQ model leaves in float: true lets TensorRT pick fp16 for them
    # (weakly typed network, INT8 + FP16 flags); false builds a strongly typed network that runs
    # exactly the types in the ONNX (INT8 where Q/DQ say so, fp32 elsewhere)
    fp16_fallback: bool = True

    def problems(self) -> list[str]:
        out = []
        if not re.fullmatch(r"\d+\.\d+(\.\d+)*", self.tensorrt):
            out.append(f"tensorrt: a version like '10.3', got {self.tensorrt!r}")
        if not re.fullmatch(r"\d+\.\d+", self.compute_capability):
            out.append(f"compute_capability: like '8.7', got {self.compute_capability!r}")
        if self.dla_cores < 0:
            out.append("dla_cores: must be >= 0")
        if self.use_dla and self.dla_cores < 1:
            out.append("use_dla: the device has no DLA cores")
        if self.use_dla and not 0 <= self.dla_core < self.dla_cores:
            out.append(f"dla_core: must be within [0, {self.dla_cores - 1}]")
        if self.workspace_mb < 16:
            out.append("workspace_mb: must be >= 16")
        return out

    @property
    def major(self) -> int:
        return int(self.tensorrt.split(".")[0])

    @property
    def strongly_typed(self) -> bool:
        """Strongly typed networks exist from TensorRT 9; before that every build is weakly typed."""
        return not self.fp16_fallback and self.major >= 9


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: Literal["onnxruntime", "openvino", "tensorrt"]
    device: str
    precision: Precision
    batch: BatchRange = BatchRange()
    quantization: Quantization | None = None
    gates: ParityGates = ParityGates()
    threads: int = 0                         # 0: the runtime's default
    tensorrt: TensorRTSpec | None = None

    def problems(self) -> list[str]:
        out = []
        if self.precision == "int8" and self.quantization is None:
            out.append("quantization: required when precision is int8")
        if self.backend == "tensorrt" and self.tensorrt is None:
            out.append("tensorrt: required for the tensorrt backend")
        if self.backend != "tensorrt" and self.tensorrt is not None:
            out.append("tensorrt: only for the tensorrt backend")
        if self.threads < 0:
            out.append("threads: must be >= 0")
        return out

    @property
    def quantized(self) -> bool:
        return self.precision == "int8"


@dataclass(frozen=True)
class CalibrationPreset:
    """Which images calibrate INT8 ranges, how many, and how ranges are computed from them."""

    name: str
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = 300
    splits: tuple[Literal["train", "val"], ...] = ("train", "val")
    selection: Literal["stratified"] = "stratified"
    percentile: float = 99.999
    seed: int = 0
    min_per_class: int = 10                  # fewer is a warning naming the class

    def problems(self) -> list[str]:
        out = []
        if self.samples < 1:
            out.append("samples: must be >= 1")
        if self.percentile < 90.0 or self.percentile > 100.0:
            out.append("percentile: must be within [90, 100]")
        if self.splits == ():
            out.append("splits: at least one of train, val")
        return out


def _profile_dir(kind: str) -> resources.abc.Traversable:
    """The checkout's top-level `targets/` or `calibration/` (people edit them there), or, in an installed
    wheel, the copy setup.py mapped into the package as `edgetransfer/profiles/<kind>/`."""
    packaged = resources.files("edgetransfer") / "profiles" / kind
    if packaged.is_dir():
        return packaged
    return resources.files("edgetransfer").parent / kind


def _names(kind: str) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _profile_dir(kind).iterdir() if p.name.endswith(".yaml"))


def _resolve(kind: str, name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate
    names = _names(kind)
    if str(name_or_path) not in names:
        import difflib

        hint = difflib.get_close_matches(str(name_or_path), names, n=1)
        raise UsageError(f"unknown {kind[:-1]} {str(name_or_path)!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; available: {', '.join(names)}", field=kind[:-1])
    with resources.as_file(_profile_dir(kind) / f"{name_or_path}.yaml") as path:
        return Path(path)


def list_targets() -> list[str]:
    return _names("targets")


def load_target(name_or_path: str | Path) -> Target:
    path = _resolve("targets", name_or_path)
    return from_dict(Target, read_yaml(path), source=path)


def list_calibration_presets() -> list[str]:
    return _names("calibration")


def load_calibration(name_or_path: str | Path) -> CalibrationPreset:
    path = _resolve("calibration", name_or_path)
    return from_dict(CalibrationPreset, read_yaml(path), source=path)


__all__ = ["BatchRange", "CalibrationPreset", "GateSpec", "ParityGates", "Quantization", "Target", "TensorRTSpec",
           "list_calibration_presets", "list_targets", "load_calibration", "load_target"]
