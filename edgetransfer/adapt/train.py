"""The training loop: one code path for CPU and CUDA, for all three transfer modes.

CUDA gets mixed precision (bf16 where supported, else fp16 with a gradient scaler) and channels_last;
the CPU runs fp32. Each epoch reseeds from (seed, epoch), so a resumed run draws the same batches and
augmentations as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..backbones import Backbone, create
from ..data.folder import DatasetSplits, dataset_hash, scan_dataset
from ..errors import UsageError
from ..fsutil import write_json, write_text
from ..progress import progress_bar
from ..spec import RunMeta
from .checkpoint import META_FILE, ResumeState, load_resume, load_weights, save_model, save_resume
from .freeze import MODES, apply_mode, param_groups
from .loader import AugmentedImages, EvalImages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's result. Saved with the run; `--resume` must match it."""

    backbone: str = "resnet18"
    weights: str = "default"
    mode: str = "finetune"
    epochs: int = 10
    img_size: int = 224
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_mult: float | None = None  # None: 0.1 with pretrained weights, 1.0 from scratch
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    patience: int = 5
    unfreeze_stages: int = 2
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    device: str = "auto"
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}", field="mode")
        for name in ("epochs", "batch_size", "img_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"must be positive, got {getattr(self, name)}", field=name)
        if not 0 <= self.label_smoothing < 1:
            raise UsageError("must be in [0, 1)", field="label_smoothing")

    @property
    def pretrained(self) -> bool:
        return self.weights not in ("none", "")


@dataclass
class TrainResult:
    run: Path
    meta: RunMeta
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def test_accuracy(self) -> float | None:
        return self.meta.metrics.get("test_accuracy")


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("CUDA was requested but no CUDA device is visible", field="device")
    return torch.device(requested)


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class _HeadInput:
    """Captures the head's input during a forward pass: that is the embedding features mode caches."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
        self.value = inputs[0].detach()

    def close(self) -> None:
        self._handle.remove()


class Trainer:
    """Holds the model, optimizer and data of one run; `fit` runs the epochs."""

    def __init__(self, splits: DatasetSplits, backbone: Backbone, config: TrainConfig, run: Path):
        self.splits, self.bb, self.config, self.run = splits, backbone, config, run
        self.model = backbone.model
        self.device = pick_device(config.device)
        self.amp_dtype = _amp_dtype(self.device)
        self.frozen_norms = apply_mode(self.model, backbone.head, config.mode, unfreeze_stages=config.unfreeze_stages)
        mult = config.backbone_lr_mult if config.backbone_lr_mult is not None else (0.1 if config.pretrained else 1.0)
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.head = self.model.get_submodule(backbone.head.path)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, backbone.head, lr=config.lr, backbone_lr=config.lr * mult,
                         weight_decay=config.weight_decay))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        spec = backbone.input_spec
        if config.mode == "features":
            self.train_data = TensorDataset(*self._embed(splits.train, "train"))
            self.val_data = TensorDataset(*self._embed(splits.val, "val"))
        else:
            self.train_data = AugmentedImages(splits.train, spec)
            self.val_data = EvalImages(splits.val, spec)
        steps_per_epoch = math.ceil(len(self.train_data) / config.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_cosine(max(1, round(config.warmup_epochs * steps_per_epoch)),
                                           steps_per_epoch * config.epochs))

    # -- data ----------------------------------------------------------------------------------
    def _loader(self, dataset: Any, *, shuffle: bool, epoch: int = 0) -> DataLoader:
        gen = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        pin = self.device.type == "cuda"
        # drop a last batch of one: BatchNorm cannot normalise a single sample in training mode
        drop_last = shuffle and len(dataset) % self.config.batch_size == 1 and len(dataset) > 1
        return DataLoader(dataset, batch_size=self.config.batch_size, shuffle=shuffle, generator=gen,
                          num_workers=self.config.num_workers, pin_memory=pin, drop_last=drop_last,
                          persistent_workers=False)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.amp_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                yield

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 and self.device.type == "cuda" else x

    @torch.no_grad()
    def _embed(self, samples: list, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the frozen backbone once over a split; the head then trains on these tensors."""
        self.model.eval()
        hook = _HeadInput(self.head)
        feats, labels = [], []
        try:
            loader = self._loader(EvalImages(samples, self.bb.input_spec), shuffle=False)
            for x, y in progress_bar(loader, f"embedding {split}"):
                with self._autocast():
                    self.model(self._to_device(x))
                feats.append(hook.value.float().cpu())
                labels.append(y)
        finally:
            hook.close()
        return torch.cat(feats), torch.cat(labels)

    def _forward(self, x: torch.Tensor, *, embedded: bool) -> torch.Tensor:
        """`embedded`: x holds cached head inputs (features mode), not images."""
        if embedded:
            out = self.head(x)
            return torch.flatten(out, 1) if self.bb.head.flatten else out
        return self.model(x)

    # -- epochs ----------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        torch.manual_seed(self.config.seed * 1_000_003 + epoch)
        self.model.train()
        for m in self.frozen_norms:
            m.eval()
        if self.config.mode == "features":
            self.model.eval()
            self.head.train()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in progress_bar(self._loader(self.train_data, shuffle=True, epoch=epoch), f"epoch {epoch}"):
            x, y = self._to_device(x), y.to(self.device)
            with self._autocast():
                logits = self._forward(x, embedded=self.config.mode == "features")
                loss = self.criterion(logits.float(), y)
            if not torch.isfinite(loss):
                raise UsageError(f"non-finite loss {loss.item()} at epoch {epoch} "
                                 f"(lr {self.scheduler.get_last_lr()[0]:.3g}); lower --lr", field="lr")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            self.scheduler.step()
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
        return {"train_loss": loss_sum / max(1, total), "train_accuracy": correct / max(1, total)}

    @torch.no_grad()
    def evaluate(self, dataset: Any, *, embedded: bool = False) -> dict[str, float]:
        self.model.eval()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in self._loader(dataset, shuffle=False):
            x, y = self._to_device(x), y.to(self.device)
            with self._autocast():
                logits = self._forward(x, embedded=embedded).float()
            loss_sum += float(nn.functional.cross_entropy(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        return {"loss": loss_sum / max(1, total), "accuracy": correct / max(1, total)}

    def fit(self, meta: RunMeta, *, resume: bool = False) -> list[dict[str, Any]]:
        history: list[dict[str, Any]] = []
        best: dict[str, Any] = {"epoch": -1, "val_accuracy": -1.0, "val_loss": math.inf}
        start = 0
        if resume:
            state = load_resume(self.run, self.model)
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            if self.scaler is not None and state.scaler:
                self.scaler.load_state_dict(state.scaler)
            history, best, start = state.history, state.best, state.epoch + 1
            log.info("resuming %s after epoch %d", self.run, state.epoch)
        for epoch in range(start, self.config.epochs):
            if epoch - best["epoch"] > self.config.patience and best["epoch"] >= 0:
                log.info("early stop: no validation improvement for %d epochs", self.config.patience)
                break
            t0 = time.perf_counter()
            row = {"epoch": epoch, **self._train_epoch(epoch)}
            val = self.evaluate(self.val_data, embedded=self.config.mode == "features")
            row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], lr=self.scheduler.get_last_lr()[0],
                       seconds=round(time.perf_counter() - t0, 3))
            history.append(row)
            improved = (val["accuracy"], -val["loss"]) > (best["val_accuracy"], -best["val_loss"])
            if improved:
                best = {"epoch": epoch, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}
                meta.metrics = {"best_epoch": epoch, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}
                save_model(self.run, self.model, meta)
            save_resume(self.run, self.model, ResumeState(
                epoch=epoch, best=best, history=history, optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict() if self.scaler else None))
            write_text(self.run / "metrics.jsonl", "".join(_jsonl(r) for r in history))
            log.info("epoch %d: loss %.4f train %.3f val %.3f%s", epoch, row["train_loss"], row["train_accuracy"],
                     val["accuracy"], " *" if improved else "")
        return history


def _jsonl(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True) + "\n"


def train(data: str | Path, out: str | Path, config: TrainConfig = TrainConfig(), *, resume: bool = False) -> TrainResult:
    """Adapt `config.backbone` to the ImageFolder tree at `data`; write the run folder `out`.

    The run holds `model.safetensors` + `meta.json` (best validation epoch), `metrics.jsonl`,
    `split.json` and resumable checkpoints. With `resume=True` an interrupted run continues from its
    last completed epoch with the same config.
    """
    run = Path(out)
    config_file = run / "train_config.json"
    if resume:
        if not config_file.exists():
            raise UsageError("cannot resume: no train_config.json here", path=run)
        saved, wanted = json.loads(config_file.read_text()), config_record(data, config)
        if saved != wanted:
            diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise UsageError(f"--resume with different settings than the interrupted run: {', '.join(diff)}",
                             path=config_file)
    elif run.exists() and any(run.iterdir()):
        raise UsageError("output folder is not empty; pick a new --out, or pass --resume to continue it", path=run)
    splits = scan_dataset(data, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed)
    torch.manual_seed(config.seed)
    bb = create(config.backbone, len(splits.classes), weights=config.weights, img_size=config.img_size)
    run.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json(config_file, config_record(data, config))
    write_json(run / "split.json", splits.record)
    meta = RunMeta(classes=splits.classes, input_spec=bb.input_spec, backbone=config.backbone, weights=bb.weights,
                   mode=config.mode, data={"root": str(Path(data).resolve()), "hash": dataset_hash(splits),
                                           "counts": splits.counts(), "seed": config.seed,
                                           "val_fraction": config.val_fraction, "test_fraction": config.test_fraction},
                   train_config=asdict(config))
    trainer = Trainer(splits, bb, config, run)
    history = trainer.fit(meta, resume=resume)
    # evaluate the best epoch's weights on the held-out test split and record it in the meta
    load_weights(trainer.model, run / "model.safetensors")
    best_meta = RunMeta.load(run / META_FILE)
    test = trainer.evaluate(EvalImages(splits.test, bb.input_spec)) if splits.test else {}
    best_meta.metrics.update({"test_accuracy": test.get("accuracy"), "test_samples": len(splits.test),
                              "epochs_run": len(history)})
    best_meta.save(run / META_FILE)
    return TrainResult(run=run, meta=best_meta, history=history)


def config_record(data: str | Path, config: TrainConfig) -> dict[str, Any]:
    return {"data": str(Path(data).resolve()), **asdict(config)}
