"""The one interface every inference backend fills in.

Polygraphy's shape: a backend only fills hooks; a runner acquires its resources on `__enter__` and
releases them on `__exit__`; nothing outside `backends/` knows which framework it is talking to.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class Runner(abc.ABC):
    """Runs one loaded model. Use as a context manager; `infer` is valid only inside it."""

    #: what actually executed, e.g. "fp32", "int8", "bf16" — reported, not assumed
    precision: str = "fp32"
    description: str = ""

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Acquire sessions, device memory, compiled models."""

    def deactivate(self) -> None:
        """Release what `activate` acquired."""

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 batch in, the model's first output out: (N, classes) logits, or an anomaly
        scorer's (N,) scores. Comparisons and timing use this one."""

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output by its graph name, in graph order (an anomaly scorer's map as well as its
        score). A backend whose models have one output need not fill this in."""
        return {"output": self.infer(batch)}


#: the record a backend's on-device build kit writes next to what it packs (`Backend.build_kit`)
KIT_FILE = "kit.json"


class Backend(abc.ABC):
    name: ClassVar[str]
    #: pip requirement that makes `available()` true, for the error message
    install_hint: ClassVar[str] = ""

    @abc.abstractmethod
    def available(self) -> str | None:
        """None if usable here, else the reason it is not (shown to the user with exit code 3)."""

    def compile(self, onnx: Path, target: Any, out: Path) -> Path:
        """Turn an ONNX file into this backend's artifact in folder `out`; return the artifact path."""
        raise NotImplementedError(f"{self.name} does not compile ONNX models")

    @abc.abstractmethod
    def load(self, artifact: Path, target: Any = None) -> Runner:
        """A runner for an artifact this backend made (or can read).

        Checks that need no framework (an artifact built for another device, a tampered file) belong
        here, so they answer even where `available()` does not."""

    def preflight(self, onnx: Path, target: Any) -> Any:
        """A report on whether `onnx` will compile for `target`, answered without the framework
        (None: this backend has none; its `compile` runs wherever the backend is available)."""
        return None

    def build_kit(self, onnx: Path, target: Any, out: Path, *, reason: str, preflight: Any = None) -> Path | None:
        """Where `compile` cannot run here, write what the device needs to compile there into `out`
        (recorded in `out/KIT_FILE`) and return the instructions a person opens first (None: this
        backend has no such kit)."""
        return None

    def artifact_files(self, artifact: Path) -> list[Path]:
        """Every file that makes up the compiled `artifact` (which `compile` returned).

        Bundling asks the backend, so that a bundle carries weights and sidecars it does not know
        about (OpenVINO's .bin next to the .xml, ONNX Runtime's session options).
        """
        return [Path(artifact)]
