"""Which ONNX operators a TensorRT release's ONNX parser imports: tables shipped as data, one per major
version (`edgetransfer/backends/tensorrt/onnx-ops-<major>.yaml`), so the preflight answers on a machine
that has no TensorRT — which is every machine but the device."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from ...errors import UsageError
from ...schema import from_dict, read_yaml


@dataclass(frozen=True)
class OpsetRange:
    min: int
    max: int


@dataclass(frozen=True)
class OperatorTable:
    tensorrt_major: int
    reference: str
    opset: OpsetRange
    quantized_types: tuple[str, ...]
    int8_layers: tuple[str, ...]
    supported: dict[str, str | None]        # operator → its restriction (None: none)
    unsupported: tuple[str, ...]

    def status(self, op_type: str) -> str:
        """"supported", "unsupported" or "unknown" (in neither list: not assumed to work)."""
        if op_type in self.supported:
            return "supported"
        return "unsupported" if op_type in self.unsupported else "unknown"


def _tables() -> resources.abc.Traversable:
    return resources.files("edgetransfer.backends.tensorrt")


def table_majors() -> list[int]:
    folder = _tables()
    return sorted(int(p.name.removeprefix("onnx-ops-").removesuffix(".yaml")) for p in folder.iterdir()
                  if p.name.startswith("onnx-ops-") and p.name.endswith(".yaml"))


@functools.cache
def operator_table(major: int) -> OperatorTable:
    """The table for TensorRT `major`; exit 2 naming the known majors when there is none."""
    if major not in table_majors():
        raise UsageError(f"no ONNX operator table for TensorRT {major}; known: "
                         f"{', '.join(map(str, table_majors()))}", field="tensorrt.tensorrt")
    with resources.as_file(_tables() / f"onnx-ops-{major}.yaml") as path:
        return from_dict(OperatorTable, read_yaml(path), source=path)
