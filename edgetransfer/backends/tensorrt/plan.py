"""What a TensorRT build does, as data: one plan read by both ways of building an engine.

The Python builder (`backend.build_engine`, on the device) and the `trtexec` command line in the
on-device build kit are generated from the same `BuildPlan`, so the engine a DeepStream or C++ user
builds with trtexec is the engine `edgetransfer compile` would have built, and the sidecar records
exactly these flags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...errors import UsageError

ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
LAYER_INFO_FILE = "layers.json"


@dataclass(frozen=True)
class BuildPlan:
    onnx: str                                # file name, next to the engine
    input: str                               # the model's input tensor name
    chw: tuple[int, int, int]
    batch: tuple[int, int, int]              # min, opt, max of the optimisation profile
    strongly_typed: bool                     # types come from the ONNX (Q/DQ → INT8, rest as declared)
    int8: bool                               # weakly typed only: allow INT8 kernels (explicit Q/DQ)
    fp16: bool                               # weakly typed only: allow fp16 where the ONNX leaves float
    workspace_mb: int
    dla_core: int | None                     # None: GPU only
    tensorrt: str                            # the version the target's device runs (major.minor)

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.chw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trtexec_argv(self, *, trtexec: str = "trtexec") -> list[str]:
        """The trtexec command that builds this plan's engine (run in the folder holding the ONNX)."""
        def dims(batch: int) -> str:
            return f"{self.input}:{'x'.join(map(str, self.shape(batch)))}"

        argv = [trtexec, f"--onnx={self.onnx}", f"--saveEngine={ENGINE_FILE}",
                f"--minShapes={dims(self.batch[0])}", f"--optShapes={dims(self.batch[1])}",
                f"--maxShapes={dims(self.batch[2])}", f"--memPoolSize=workspace:{self.workspace_mb}",
                f"--timingCacheFile={TIMING_CACHE_FILE}"]
        if self.strongly_typed:
            argv.append("--stronglyTyped")
        else:
            argv += ["--int8"] * self.int8 + ["--fp16"] * self.fp16
        if self.dla_core is not None:
            argv += [f"--useDLACore={self.dla_core}", "--allowGPUFallback"]
        # which layers ran in which precision: what to read when INT8 accuracy or speed disappoints
        argv += ["--profilingVerbosity=detailed", f"--exportLayerInfo={LAYER_INFO_FILE}"]
        return argv


def make_plan(onnx: Path, target: Any) -> BuildPlan:
    """The plan for building `onnx` for `target` (a Target with a `tensorrt` section)."""
    import onnx as onnx_lib

    spec = target.tensorrt
    model = onnx_lib.load(str(onnx), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UsageError(f"{len(inputs)} inputs; edgetransfer builds single-input image models", path=onnx)
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or min(dims[1:]) <= 0:
        raise UsageError(f"input {inputs[0].name!r} must be N×C×H×W with fixed C, H, W; run `edgetransfer check`",
                         path=onnx)
    strongly_typed = spec.strongly_typed and target.precision == "int8"
    return BuildPlan(onnx=Path(onnx).name, input=inputs[0].name, chw=(dims[1], dims[2], dims[3]),
                     batch=(target.batch.min, target.batch.opt, target.batch.max),
                     strongly_typed=strongly_typed,
                     int8=not strongly_typed and target.precision == "int8",
                     fp16=not strongly_typed and (target.precision == "fp16" or spec.fp16_fallback),
                     workspace_mb=spec.workspace_mb, dla_core=spec.dla_core if spec.use_dla else None,
                     tensorrt=spec.tensorrt)
