"""Checkpoints: safetensors weights + JSON meta, and a resumable training state.

The deliverable of a run is `model.safetensors` + `meta.json`. Resuming needs more (optimizer,
scheduler, AMP scaler, history); that lives in `checkpoints/`, written after every epoch:
`last.safetensors` (weights), `last.state.pt` (plain tensors and numbers only, so it loads with
`weights_only=True`) and `last.json`, written last, which names the epoch and the sha256 of the two
others so a half-written pair is detected instead of silently resumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import IntegrityError, UsageError
from ..fsutil import atomic_path, sha256_file, write_json
from ..spec import RunMeta

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_weights(model: nn.Module, path: Path) -> None:
    """Strict load: a run's weights must fit the architecture its meta describes exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except FileNotFoundError as exc:
        raise UsageError("weights file missing; did training finish?", path=path) from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise IntegrityError(f"unreadable safetensors file ({exc})", path=path) from exc
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise IntegrityError(f"weights do not match the architecture: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}", path=path)


def save_model(run: Path, model: nn.Module, meta: RunMeta) -> None:
    """Weights first, meta second: a meta.json always describes complete weights next to it."""
    save_weights(model, run / MODEL_FILE, {"backbone": meta.backbone})
    meta.save(run / META_FILE)


@dataclass
class ResumeState:
    epoch: int
    best: dict[str, Any]
    history: list[dict[str, Any]]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None


def save_resume(run: Path, model: nn.Module, state: ResumeState) -> None:
    ckpt = run / "checkpoints"
    save_weights(model, ckpt / "last.safetensors")
    with atomic_path(ckpt / "last.state.pt") as tmp:
        torch.save({"optimizer": state.optimizer, "scheduler": state.scheduler, "scaler": state.scaler}, tmp)
    write_json(ckpt / "last.json", {
        "epoch": state.epoch, "best": state.best, "history": state.history,
        "sha256": {name: sha256_file(ckpt / name) for name in ("last.safetensors", "last.state.pt")},
    })


def load_resume(run: Path, model: nn.Module) -> ResumeState:
    ckpt = run / "checkpoints"
    index = ckpt / "last.json"
    if not index.exists():
        raise UsageError("nothing to resume: no checkpoints/last.json (the run never finished an epoch)", path=run)
    try:
        info = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"corrupt resume index ({exc})", path=index) from exc
    for name, digest in info["sha256"].items():
        if sha256_file(ckpt / name) != digest:
            raise IntegrityError("does not match the sha256 recorded in last.json (interrupted write or tampering)",
                                 path=ckpt / name)
    load_weights(model, ckpt / "last.safetensors")
    extra = torch.load(ckpt / "last.state.pt", map_location="cpu", weights_only=True)
    return ResumeState(epoch=info["epoch"], best=info["best"], history=info["history"],
                       optimizer=extra["optimizer"], scheduler=extra["scheduler"], scaler=extra["scaler"])


def load_model(run: Path) -> tuple[nn.Module, RunMeta]:
    """Rebuild a run's model from its meta (architecture, classes) and its weights."""
    from ..backbones import create

    run = Path(run)
    meta = RunMeta.load(run / META_FILE)
    bb = create(meta.backbone, len(meta.classes), weights="none", img_size=meta.input_spec.height)
    load_weights(bb.model, run / MODEL_FILE)
    return bb.model.eval(), meta
