"""TensorRT: QDQ ONNX → serialized engine on the Jetson, and a runner for it.

Written against TensorRT's own Python API (TensorRT 10, with the TensorRT 8.5 differences handled),
never a stand-in: where `import tensorrt` fails, `available()` says so and compile writes the
on-device build kit instead. Buffers are torch CUDA tensors (no pycuda).

Build: explicit quantization from the Q/DQ nodes; the target's precision policy picks a strongly
typed network (types exactly as the ONNX says) or a weakly typed one with INT8 + fp16 fallback; one
optimisation profile over the target's batch range; a workspace limit; a DLA core when the profile
asks for one; and a timing cache persisted next to the engine so rebuilds are fast.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DependencyError, IntegrityError, UsageError
from ...fsutil import atomic_path
from ..base import Backend, Runner
from .kit import write_build_kit
from .plan import ENGINE_FILE, TIMING_CACHE_FILE, BuildPlan, make_plan
from .sidecar import SIDECAR_FILE, check_engine, this_machine, write_record

log = logging.getLogger(__name__)


class TensorRTRunner(Runner):
    """Runs a serialized engine whose sidecar matched this machine."""

    def __init__(self, engine: Path, record: dict[str, Any]):
        self.engine_path = engine
        self.record = record
        build = record.get("build", {})
        self.precision = "+".join(p for p, on in (("int8", build.get("int8") or build.get("strongly_typed")),
                                                  ("fp16", build.get("fp16"))) if on) or "fp32"
        self.description = f"TensorRT {record.get('tensorrt')} ({record.get('gpu')})"
        self.engine: Any = None
        self.context: Any = None

    def activate(self) -> None:
        import tensorrt as trt
        import torch

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        dla_core = self.record.get("build", {}).get("dla_core")
        if dla_core is not None:
            runtime.DLA_core = int(dla_core)
        self.engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise IntegrityError("TensorRT could not deserialize the engine", path=self.engine_path)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        self.input = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self.outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def deactivate(self) -> None:
        self.context = self.engine = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return next(iter(self.infer_outputs(batch).values()))

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input, tuple(x.shape))
        self.context.set_tensor_address(self.input, x.data_ptr())
        ys = {}
        for name in self.outputs:  # shapes known once the input shape is set
            ys[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, ys[name].data_ptr())
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return {name: y.cpu().numpy() for name, y in ys.items()}


class TensorRTBackend(Backend):
    name = "tensorrt"
    install_hint = "JetPack's python3-libnvinfer on the device (or NVIDIA's tensorrt wheels on a desktop GPU)"

    def available(self) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return f"TensorRT is not installed ({self.install_hint})"
        if importlib.util.find_spec("torch") is None:
            return "torch (with CUDA) is needed for TensorRT's device buffers"
        machine = this_machine()
        if machine.gpu is None:
            return "no CUDA GPU is visible"
        return None

    def preflight(self, onnx: Path, target: Any) -> Any:
        from .preflight import preflight

        return preflight(onnx, target)

    def build_kit(self, onnx: Path, target: Any, out: Path, *, reason: str, preflight: Any = None) -> Path:
        return write_build_kit(onnx, target, out, reason=reason, preflight=preflight)

    def artifact_files(self, artifact: Path) -> list[Path]:
        return [artifact, artifact.parent / SIDECAR_FILE]

    def compile(self, onnx: Path, target: Any, out: Path) -> Path:
        """Build `out/model.engine` (+ sidecar), on the device the target names and nowhere else."""
        machine = this_machine()
        spec = target.tensorrt
        mismatch = []
        if machine.compute_capability != spec.compute_capability:
            mismatch.append(f"this GPU is {machine.gpu} (compute capability {machine.compute_capability}), "
                            f"the target's is {spec.gpu} ({spec.compute_capability})")
        if machine.tensorrt is None or machine.tensorrt.split(".")[:2] != spec.tensorrt.split(".")[:2]:
            mismatch.append(f"this machine has TensorRT {machine.tensorrt}, the target runs {spec.tensorrt}")
        if mismatch:
            reason = "; ".join(mismatch)
            instructions = write_build_kit(onnx, target, out, reason=reason)
            raise DependencyError(f"an engine built here would not run on {target.name}: {reason}. Wrote the "
                                  f"on-device build kit instead: {instructions}")
        plan = make_plan(onnx, target)
        engine = Path(out) / ENGINE_FILE
        build_engine(Path(onnx), plan, engine, timing_cache=Path(out) / TIMING_CACHE_FILE)
        write_record(engine, machine=machine, plan=plan.to_dict(), onnx=Path(onnx))
        return engine

    def load(self, artifact: Path, target: Any = None) -> Runner:
        """A runner for the engine, after its sidecar is checked against this machine (exit 3/4 here,
        before TensorRT deserializes a byte)."""
        path = Path(artifact)
        if path.is_dir():
            path = path / ENGINE_FILE
        record = check_engine(path)
        return TensorRTRunner(path, record)


def build_engine(onnx: Path, plan: BuildPlan, engine: Path, *, timing_cache: Path) -> None:
    """Parse `onnx`, build per `plan`, write the serialized engine atomically; reuse and update the timing cache."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if int(trt.__version__.split(".")[0]) < 10:  # implicit batch was the default before TensorRT 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UsageError(f"TensorRT's ONNX parser refused the model: {errors}; run `edgetransfer check`", path=onnx)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mb << 20)
    if plan.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    if plan.fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()
    profile.set_shape(plan.input, plan.shape(plan.batch[0]), plan.shape(plan.batch[1]), plan.shape(plan.batch[2]))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log.info("building the TensorRT engine (minutes on a Jetson)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UsageError("TensorRT could not build an engine from the model (its log above says why)", path=onnx)
    with atomic_path(engine) as tmp:
        tmp.write_bytes(bytes(serialized))
    with atomic_path(timing_cache) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
