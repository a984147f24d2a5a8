"""PyTorch eager: the reference every exported artifact is compared with."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from ..export import OUTPUT_NAME
from ..spec import ANOMALY_OUTPUTS
from .base import Backend, Runner


class TorchRunner(Runner):
    """Runs a run folder's checkpoint in fp32 eval mode."""

    def __init__(self, run: Path, device: str = "cpu"):
        self.run = run
        self.device = device
        self.model: Any = None
        self.description = f"torch eager ({device})"

    def activate(self) -> None:
        from ..adapt.checkpoint import load_model

        self.model, _ = load_model(self.run)
        self.model.eval().to(self.device)

    def deactivate(self) -> None:
        self.model = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return next(iter(self.infer_outputs(batch).values()))

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Named as the export names them: `logits`, or an anomaly scorer's `score` and `anomaly_map`."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            out = self.model(x)
        if isinstance(out, tuple):
            return {name: o.float().cpu().numpy() for name, o in zip(ANOMALY_OUTPUTS, out)}
        return {OUTPUT_NAME: out.float().cpu().numpy()}


class TorchBackend(Backend):
    name = "torch"
    install_hint = "pip install 'edgetransfer[train]'"

    def available(self) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return f"torch is not installed ({self.install_hint})"
        return None

    def load(self, artifact: Path, target: Any = None) -> Runner:
        return TorchRunner(Path(artifact))
