"""Checkpoints: safetensors weights + JSON meta, and a resumable training state.

The deliverable of a run is `model.safetensors` + `meta.json`, which records the weights' sha256 so
a flipped bit or a swapped file is refused (exit 4) instead of silently exported. Resuming needs more
(optimizer, scheduler, AMP scaler, history); that lives in `checkpoints/`, written after every epoch:
`epoch-N.safetensors` (weights), `epoch-N.state.pt` (plain tensors and numbers only, so it loads
with `weights_only=True`) and `last.json`, written last and atomically, which names the epoch, the
sha256 of both files, and the previous epoch's entry. The previous epoch's files are kept until the
next epoch is complete, so a resume whose newest files are damaged falls back to the newest complete
checkpoint instead of failing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import IntegrityError, UsageError
from ..fsutil import atomic_path, sha256_file, write_json
from ..spec import RunMeta
from ..tensorfile import check_finite, load_torch_weights, read_safetensors

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
INDEX_FILE = "last.json"


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write the weights atomically; non-finite weights are never written (a NaN best checkpoint
    would silently replace a good one)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    try:
        check_finite(state, path)
    except IntegrityError as exc:
        raise UsageError(f"refusing to save: {exc}", path=path) from exc
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_weights(model: nn.Module, path: Path, *, sha256: str | None = None) -> None:
    """Strict load: a run's weights must fit the architecture its meta describes exactly, and match
    the sha256 recorded with them."""
    if not Path(path).exists():
        raise UsageError("weights file missing; did training finish?", path=path)
    if sha256 is not None and sha256_file(path) != sha256:
        raise IntegrityError("does not match the sha256 recorded when it was written (damaged or replaced)",
                             path=path)
    state = read_safetensors(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise IntegrityError(f"weights do not match the architecture: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}", path=path)


def save_model(run: Path, model: nn.Module, meta: RunMeta) -> None:
    """Weights first, meta second: a meta.json always describes complete weights next to it."""
    save_weights(model, run / MODEL_FILE, {"backbone": meta.backbone})
    meta.weights_sha256 = sha256_file(run / MODEL_FILE)
    meta.save(run / META_FILE)


@dataclass
class ResumeState:
    epoch: int
    best: dict[str, Any]
    history: list[dict[str, Any]]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None


def _names(epoch: int) -> tuple[str, str]:
    return f"epoch-{epoch}.safetensors", f"epoch-{epoch}.state.pt"


def save_resume(run: Path, model: nn.Module, state: ResumeState) -> None:
    """Write this epoch's checkpoint, then the index naming it (and the previous one), then drop
    every older checkpoint file."""
    ckpt = run / "checkpoints"
    weights, extra = _names(state.epoch)
    save_weights(model, ckpt / weights)
    with atomic_path(ckpt / extra) as tmp:
        torch.save({"optimizer": state.optimizer, "scheduler": state.scheduler, "scaler": state.scaler}, tmp)
    previous = _read_index(ckpt / INDEX_FILE, strict=False)
    entry = {"epoch": state.epoch, "best": state.best, "history": state.history,
             "sha256": {name: sha256_file(ckpt / name) for name in (weights, extra)}}
    keep = {k: v for k, v in (previous or {}).items() if k != "previous"} if previous else None
    write_json(ckpt / INDEX_FILE, {**entry, "previous": keep})
    wanted = set(entry["sha256"]) | set((keep or {}).get("sha256", {}))
    for old in ckpt.glob("epoch-*"):
        if old.name not in wanted:
            old.unlink(missing_ok=True)


def _read_index(index: Path, *, strict: bool = True) -> dict[str, Any] | None:
    try:
        info = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), dict):
            raise ValueError("not a checkpoint index")
        return info
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if strict:
            raise IntegrityError(f"corrupt resume index ({exc})", path=index) from exc
        return None


def _intact(ckpt: Path, entry: dict[str, Any]) -> str | None:
    """None when every file of the entry exists with its recorded sha256, else the first problem."""
    for name, digest in entry["sha256"].items():
        if "/" in name or "\\" in name or name.startswith("."):
            return f"{name}: not a checkpoint file name"
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} does not match its recorded sha256 (interrupted write, damage or tampering)"
    return None


def load_resume(run: Path, model: nn.Module) -> ResumeState:
    """The newest complete checkpoint; a damaged newest one falls back to the previous epoch's."""
    ckpt = run / "checkpoints"
    info = _read_index(ckpt / INDEX_FILE)
    if info is None:
        raise UsageError("nothing to resume: no checkpoints/last.json (the run never finished an epoch); run the "
                         "same command without --resume to start it again in this folder", path=run)
    problems = []
    for entry in (info, info.get("previous")):
        if not entry:
            continue
        problem = _intact(ckpt, entry)
        if problem is not None:
            problems.append(problem)
            continue
        if problems:
            log.warning("resuming from epoch %d: the newest checkpoint is unusable (%s)", entry["epoch"], problems[0])
        weights, extra = sorted(entry["sha256"], key=lambda n: not n.endswith(".safetensors"))
        load_weights(model, ckpt / weights)
        state = load_torch_weights(ckpt / extra)
        return ResumeState(epoch=entry["epoch"], best=entry["best"], history=entry["history"],
                           optimizer=state["optimizer"], scheduler=state["scheduler"], scaler=state["scaler"])
    raise IntegrityError("no complete checkpoint to resume from: " + "; ".join(problems), path=ckpt)


def load_model(run: Path) -> tuple[nn.Module, RunMeta]:
    """Rebuild a run's model from its meta (architecture, classes) and its weights."""
    from ..backbones import create

    run = Path(run)
    meta = RunMeta.load(run / META_FILE)
    if meta.task == "anomaly":
        from ..anomaly.fit import load_scorer

        return load_scorer(run, meta), meta
    bb = create(meta.backbone, len(meta.classes), weights="none", img_size=meta.input_spec.height)
    load_weights(bb.model, run / MODEL_FILE, sha256=meta.weights_sha256)
    return bb.model.eval(), meta
