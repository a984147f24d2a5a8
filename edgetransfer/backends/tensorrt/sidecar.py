"""The engine's sidecar (`engine.json`) and the question it answers: may this machine load that engine?

A serialized engine runs only with the TensorRT version and on the GPU model that built it; handed
anything else, TensorRT fails deep inside deserialization (or worse, loads and misbehaves). So every
engine is written with a sidecar recording TensorRT version, GPU name, compute capability, the build
plan and the sha256 of the engine and of the ONNX it came from, and a load compares the sidecar with
this machine *before* TensorRT is asked to deserialize anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import DependencyError, IntegrityError
from ...fsutil import sha256_file

SIDECAR_FILE = "engine.json"
SCHEMA = 1


@dataclass(frozen=True)
class Machine:
    """What an engine is specific to, as found on a machine (None: absent there)."""

    tensorrt: str | None
    gpu: str | None
    compute_capability: str | None

    def describe(self) -> str:
        gpu = f"GPU {self.gpu} (compute capability {self.compute_capability})" if self.gpu else "no CUDA GPU"
        return f"TensorRT {self.tensorrt or 'not installed'}, {gpu}"


def this_machine() -> Machine:
    """TensorRT's version and GPU 0, probed without deserializing anything.

    The GPU comes from cuda-python when it is installed (the torch-free device runtime), else torch.
    """
    try:
        import tensorrt

        version: str | None = str(tensorrt.__version__)
    except ImportError:
        version = None
    name, capability = _gpu_from_cuda_python() or _gpu_from_torch() or (None, None)
    return Machine(tensorrt=version, gpu=name, compute_capability=capability)


def _gpu_from_cuda_python() -> tuple[str, str] | None:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        return None
    err, prop = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    return prop.name.decode(errors="replace").rstrip("\0"), f"{prop.major}.{prop.minor}"


def _gpu_from_torch() -> tuple[str, str] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def _release(version: str) -> tuple[str, ...]:
    """major.minor.patch: what must match for an engine to deserialize (the build number may differ)."""
    return tuple(version.split(".")[:3])


def engine_problems(record: dict[str, Any], machine: Machine) -> list[str]:
    """Why the engine described by `record` cannot run on `machine` (empty: it can)."""
    problems = []
    built = str(record.get("tensorrt", "?"))
    if machine.tensorrt is None or _release(machine.tensorrt) != _release(built):
        problems.append(f"TensorRT {built} built it, this machine has TensorRT {machine.tensorrt or 'not installed'}")
    if machine.gpu is None:
        problems.append(f"it needs a {record.get('gpu')} GPU, this machine has no CUDA GPU")
    elif (machine.gpu, machine.compute_capability) != (record.get("gpu"), record.get("compute_capability")):
        problems.append(f"it was built on {record.get('gpu')} (compute capability {record.get('compute_capability')}), "
                        f"this machine has {machine.gpu} (compute capability {machine.compute_capability})")
    return problems


def write_record(engine: Path, *, machine: Machine, plan: dict[str, Any], onnx: Path) -> dict[str, Any]:
    from ...fsutil import write_json

    record = {"schema": SCHEMA, "engine": engine.name, "engine_sha256": sha256_file(engine),
              "tensorrt": machine.tensorrt, "gpu": machine.gpu, "compute_capability": machine.compute_capability,
              "build": plan, "source": {"onnx": onnx.name, "sha256": sha256_file(onnx)}}
    write_json(engine.parent / SIDECAR_FILE, record)
    return record


def read_record(engine: Path) -> dict[str, Any]:
    """The sidecar next to `engine`; exit 4 when it is missing, unreadable or from a newer schema."""
    path = Path(engine).parent / SIDECAR_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IntegrityError(f"engine without its sidecar {SIDECAR_FILE}: refusing to deserialize an engine of "
                             "unknown origin; rebuild it with `edgetransfer compile`", path=engine) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"unreadable engine sidecar ({exc})", path=path) from exc
    if not isinstance(record, dict) or not isinstance(record.get("schema"), int):
        raise IntegrityError("not an engine sidecar (no integer 'schema')", path=path)
    if record["schema"] > SCHEMA:
        raise IntegrityError(f"sidecar schema {record['schema']} is newer than this edgetransfer reads ({SCHEMA}); "
                             "upgrade edgetransfer", path=path, field="schema")
    return record


def check_engine(engine: Path, machine: Machine | None = None) -> dict[str, Any]:
    """The engine's sidecar, once its hash matches and this machine can run it (exit 4 / exit 3 otherwise)."""
    engine = Path(engine)
    record = read_record(engine)
    if not engine.is_file():
        raise IntegrityError("engine file missing next to its sidecar", path=engine)
    if sha256_file(engine) != record.get("engine_sha256"):
        raise IntegrityError("engine does not match the sha256 its sidecar recorded: modified or truncated",
                             path=engine, field="engine_sha256")
    machine = machine or this_machine()
    problems = engine_problems(record, machine)
    if problems:
        built = Machine(record.get("tensorrt"), record.get("gpu"), record.get("compute_capability"))
        raise DependencyError(f"this engine cannot run here: {'; '.join(problems)}. Built for: {built.describe()}. "
                              f"This machine: {machine.describe()}. Rebuild it on this device with "
                              "`edgetransfer compile RUN --target NAME`", path=engine)
    return record
