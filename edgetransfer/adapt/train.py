"""The training loop: one code path for CPU, one GPU and many, for all three transfer modes.

Every device gets channels_last: depthwise convolutions vectorise across channels, and on a 2-core
AMD EPYC the demo's EfficientNet-Lite0 finetuning took 65 s with it, 104 s without. CUDA also gets
mixed precision (bf16 where supported, else fp16 with a gradient scaler), fused AdamW, pinned-memory
loading with persistent workers, and `torch.compile` on request; the CPU runs fp32. Under torchrun
the same loop runs in every process with DistributedDataParallel (see
`distributed.py`). Randomness depends only on (seed, epoch, sample), so a resumed run draws the same
batches and augmentations as an uninterrupted one, on any number of processes.

Per-step numbers (loss, correct) stay on the device and are summed once per epoch, so a GPU step
never waits for the host.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..backbones import Backbone, create
from ..data.folder import DatasetSplits, dataset_hash, require_trainable, scan_dataset
from ..errors import UsageError
from ..fsutil import write_json, write_text
from ..progress import progress_bar
from ..spec import RESIZE_POLICIES, RunMeta
from ..weight_sources import Normalization
from .checkpoint import META_FILE, MODEL_FILE, ResumeState, load_resume, load_weights, save_model, save_resume
from .distributed import World, pick_device, world_session
from .freeze import MODES, apply_mode, param_groups
from .loader import AugmentedImages, EvalImages, GlobalBatchSampler, augmentation, mix_seed, rank_shard

log = logging.getLogger(__name__)

SHARDS_FILE = "shards.json"


class TrainingDiverged(UsageError):
    """The loss became NaN or infinite: training stops there (exit 2); no checkpoint is written from it."""


#: the input sides and loader worker count a run accepts (exit 2 outside them)
MIN_IMG_SIZE, MAX_IMG_SIZE = 8, 4096
MAX_WORKERS = 64


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's result. Saved with the run; `--resume` must match it
    (except `num_workers` and `compile`, which change only the speed).

    `batch_size` is the global batch: N processes take batch_size/N each, so the same command makes
    the same optimisation steps on one device or many.
    """

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
    num_workers: int | None = None  # None: 0 on the CPU, min(8, cores per process - 1) on CUDA
    compile: bool = False
    skip_bad_images: float = 0.0    # up to this fraction of unreadable images is skipped (and listed)
    resize: str = "letterbox"       # crop | stretch | letterbox: the geometry, for training and deployment alike
    augment: str = "surface"        # a preset of loader.AUGMENTATIONS (label-preserving for inspection images)
    bn: str = "auto"                # BatchNorm statistics while training: auto | train | frozen (see bn_frozen)
    mean: tuple[float, float, float] | None = None  # override the weights' own normalisation (with std)
    std: tuple[float, float, float] | None = None

    #: other tools' names for these settings, for a recipe's did-you-mean
    ALIASES: ClassVar[dict[str, str]] = {"learning_rate": "lr", "image_size": "img_size", "num_epochs": "epochs",
                                         "batch": "batch_size", "workers": "num_workers", "imgsz": "img_size"}

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:  # every problem at once; `field` names the first, `problems` lists them for a recipe
            field, _, first = problems[0].partition(": ")
            error = UsageError(" | ".join([first, *problems[1:]]), field=field)
            error.problems = problems
            raise error
        for name in ("mean", "std"):
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))

    def problems(self) -> list[str]:
        """Every setting a run cannot use, as "field: why" (empty when none).

        A value of the wrong type (a recipe field the schema already refused) is skipped here, so the
        other fields' problems are still listed with it."""
        out: list[str] = []

        def number(name: str) -> float | None:
            value = getattr(self, name)
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        def choice(name: str, options: Sequence[str], what: str) -> None:
            value = getattr(self, name)
            if isinstance(value, str) and value not in options:
                close = difflib.get_close_matches(value, list(options), n=1)
                out.append(f"{name}: unknown {what} {value!r}; choose one of {', '.join(options)}"
                           + (f" (did you mean {close[0]!r}?)" if close else ""))

        choice("mode", MODES, "mode")
        choice("resize", list(RESIZE_POLICIES), "resize policy")
        choice("bn", ("auto", "train", "frozen"), "bn policy")
        if isinstance(self.augment, str):
            try:
                augmentation(self.augment)
            except UsageError as exc:
                out.append(f"augment: {str(exc).removeprefix(f'field {exc.field!r}: ')}")
        for name, least in (("epochs", 1), ("batch_size", 1), ("img_size", MIN_IMG_SIZE)):
            if (value := number(name)) is not None and value < least:
                out.append(f"{name}: must be at least {least}, got {value}")
        # upper bounds a run can meet: beyond them a loader allocates gigabytes or forks thousands
        for name, most in (("img_size", MAX_IMG_SIZE), ("num_workers", MAX_WORKERS)):
            if (value := number(name)) is not None and value > most:
                out.append(f"{name}: must be at most {most}, got {value}")
        for name in ("lr", "weight_decay", "warmup_epochs", "backbone_lr_mult", "val_fraction", "test_fraction"):
            if (value := number(name)) is None:
                continue
            positive = name == "lr"  # a zero learning rate trains nothing
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                out.append(f"{name}: must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
        if (value := number("label_smoothing")) is not None and not 0 <= value < 1:
            out.append(f"label_smoothing: must be in [0, 1), got {value}")
        if (value := number("num_workers")) is not None and value < 0:
            out.append(f"num_workers: must be 0 or more, got {value}")
        if (value := number("skip_bad_images")) is not None and not 0 <= value < 0.5:
            out.append(f"skip_bad_images: must be in [0, 0.5), got {value}")
        if (self.mean is None) != (self.std is None):
            out.append(f"{'mean' if self.mean is None else 'std'}: give --mean and --std together")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (tuple, list)) and (
                    len(value) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
                    or (name == "std" and min(value) <= 0)):
                out.append(f"{name}: needs three finite values{', all positive' if name == 'std' else ''}, got {value}")
        return out

    @property
    def pretrained(self) -> bool:
        return self.weights not in ("none", "")

    def bn_frozen(self, world_size: int = 1, train_images: int | None = None) -> bool:
        """Whether BatchNorm keeps its pretrained running statistics while everything else learns.

        Statistics of a few images are noise: below 16 images per process each batch would overwrite
        the pretrained statistics with that noise, and on a small training set (under 2,000 images)
        the statistics fitted to it differ from those of unseen images. "auto" therefore keeps them
        for pretrained weights in either case (their affine scale and shift still learn). Measured on
        the demo's defect task (250 images, batch 32): 0.957 test accuracy with frozen statistics
        against 0.947 with batch statistics. From scratch there are no statistics worth keeping.
        """
        if self.bn != "auto":
            return self.bn == "frozen"
        small = train_images is not None and train_images < 2000
        return self.pretrained and (self.batch_size // max(1, world_size) < 16 or small)

    @property
    def normalization(self) -> Normalization | None:
        """The user's override of the weights' normalisation, if any."""
        if self.mean is None or self.std is None:
            return None
        return Normalization(mean=self.mean, std=self.std)


@dataclass
class TrainResult:
    run: Path
    meta: RunMeta
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def test_accuracy(self) -> float | None:
        return self.meta.metrics.get("test_accuracy")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it (no scaler needed), else fp16 (with a scaler); None: fp32 (the CPU)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader workers: augmentation must keep up with a GPU, but on a CPU it competes with the model."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_process - 1))


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
    """Holds the model, optimizer and data of one run (one process of it); `fit` runs the epochs.

    Features mode runs the frozen backbone once: each process embeds every N-th image and all
    processes gather the whole cache. Every process then trains the same head on the same cache
    without DistributedDataParallel: a head step on cached embeddings costs microseconds, less than
    the all-reduce DDP would add, and identical work in every process gives exactly the result of a
    single-process run.
    """

    def __init__(self, splits: DatasetSplits, backbone: Backbone, config: TrainConfig, run: Path,
                 world: World | None = None):
        self.splits, self.bb, self.config, self.run = splits, backbone, config, run
        self.world = world or World(device=pick_device(config.device))
        self.device = self.world.device
        self.amp_dtype = amp_dtype(self.device)
        self.features = config.mode == "features"
        self.workers = loader_workers(config.num_workers, self.device)
        model = backbone.model
        if self.world.distributed and self.device.type == "cuda" and not self.features:
            # BatchNorm over the global batch, as one GPU would compute it (CPU/gloo has no SyncBatchNorm)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.frozen_norms = apply_mode(self.model, backbone.head, config.mode, unfreeze_stages=config.unfreeze_stages)
        if config.bn_frozen(self.world.world_size, len(splits.train)):
            self.frozen_norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        mult = config.backbone_lr_mult if config.backbone_lr_mult is not None else (0.1 if config.pretrained else 1.0)
        self.model.to(self.device, memory_format=torch.channels_last)
        self.head = self.model.get_submodule(backbone.head.path)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, backbone.head, lr=config.lr, backbone_lr=config.lr * mult,
                         weight_decay=config.weight_decay),
            fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        # summed, then scaled by world_size / global batch in `step`: DDP's average is then the global mean
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing, reduction="sum")
        spec = backbone.input_spec
        self.embedding_shards: dict[str, list[list[int]]] = {}
        self.embedding_seconds = 0.0  # features mode: the one backbone pass, which dominates its cost
        self.epoch_samples: list[int] = []  # the train indices this process stepped on in the last epoch
        if self.features:
            started = time.perf_counter()
            self.train_data: Dataset = TensorDataset(*self._embed(splits.train, "train"))
            self.val_data: Dataset = TensorDataset(*self._embed(splits.val, "val"))
            self.embedding_seconds = round(time.perf_counter() - started, 1)
            rank, size = 0, 1  # every process steps through the whole cache
        else:
            self.train_data = AugmentedImages(splits.train, spec, seed=config.seed,
                                              augment=augmentation(config.augment))
            self.val_data = EvalImages(splits.val, spec)
            rank, size = self.world.rank, self.world.world_size
        self.step_world = size
        # a diverged loss stops training at its step; on CUDA that costs a host sync, so look every 16 steps
        self.nan_check_every = 16 if self.device.type == "cuda" else 1
        self.sampler = GlobalBatchSampler(len(self.train_data), config.batch_size, seed=config.seed,
                                          rank=rank, world_size=size, keyed=not self.features)
        if size > 1 and min(self.sampler.global_batch_sizes(), default=0) < 2 * size:
            raise UsageError(f"{size} processes need at least 2 images each per batch: --batch-size and the "
                             f"training split ({len(self.train_data)} images) must be at least {2 * size}",
                             field="batch_size")
        self.train_loader = None if self.features else self._loader(self.train_data, batch_sampler=self.sampler,
                                                                    persistent=True)
        self._val_loader: DataLoader | None = None
        self.net: nn.Module = self.model  # what the training forward calls: maybe DDP-wrapped and compiled
        if not self.features:
            if self.world.distributed:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.net = DistributedDataParallel(self.model, device_ids=ids)
            if config.compile:
                self.net = torch.compile(self.net)
        steps_per_epoch = max(1, len(self.sampler))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_cosine(max(1, round(config.warmup_epochs * steps_per_epoch)),
                                           steps_per_epoch * config.epochs))

    # -- data ----------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, *, persistent: bool = False, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, num_workers=self.workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=persistent and self.workers > 0, **kwargs)

    def _eval_batches(self, dataset: Dataset) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's share (every N-th sample) of an evaluation set, in batches."""
        shard = rank_shard(len(dataset), self.world.rank, self.world.world_size)
        bs = self.config.batch_size
        if isinstance(dataset, TensorDataset):  # cached embeddings: slice, no loader
            feats, labels = dataset.tensors
            for i in range(0, len(shard), bs):
                idx = torch.tensor(shard[i:i + bs], dtype=torch.long)
                yield feats[idx], labels[idx]
            return
        if dataset is self.val_data:
            if self._val_loader is None:
                self._val_loader = self._loader(Subset(dataset, shard), batch_size=bs, persistent=True)
            loader = self._val_loader
        else:
            loader = self._loader(Subset(dataset, shard), batch_size=bs)
        yield from loader

    def _train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        if self.features:
            feats, labels = self.train_data.tensors
            for idx in self.sampler:
                i = torch.tensor(idx, dtype=torch.long)
                yield feats[i], labels[i], i
        else:
            yield from self.train_loader

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.amp_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                yield

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x

    @torch.no_grad()
    def _embed(self, samples: list, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the frozen backbone once over a split; the head then trains on these tensors.

        Process r embeds samples r, r+N, ...; the shards are gathered back into sample order, so
        every process holds the same cache a single process would have computed.
        """
        self.model.eval()
        n, rank, size = len(samples), self.world.rank, self.world.world_size
        shards = [rank_shard(n, r, size) for r in range(size)]
        mine = shards[rank]
        # a process without samples still embeds one, to learn the embedding's shape for the gather
        todo = mine if mine or n == 0 else [0]
        hook = _HeadInput(self.head)
        feats, labels = [], []
        try:
            loader = self._loader(Subset(EvalImages(samples, self.bb.input_spec), todo),
                                  batch_size=self.config.batch_size)
            for x, y in progress_bar(loader, f"embedding {split}"):
                with self._autocast():
                    self.model(self._to_device(x))
                feats.append(hook.value.float().cpu())
                labels.append(y)
        finally:
            hook.close()
        local_x, local_y = torch.cat(feats)[:len(mine)], torch.cat(labels)[:len(mine)]
        if size == 1:
            return local_x, local_y
        counts = [len(s) for s in shards]
        all_x, all_y = self.world.gather_rows(local_x, counts), self.world.gather_rows(local_y, counts)
        out_x = torch.empty((n, *local_x.shape[1:]), dtype=local_x.dtype)
        out_y = torch.empty(n, dtype=local_y.dtype)
        for r in range(size):
            out_x[r::size], out_y[r::size] = all_x[r], all_y[r]
        self.embedding_shards[split] = shards
        return out_x, out_y

    # -- steps and epochs ------------------------------------------------------------------------
    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features:  # x holds cached head inputs, not images
            out = self.head(x)
            return torch.flatten(out, 1) if self.bb.head.flatten else out
        return self.net(x)

    def step(self, x: torch.Tensor, y: torch.Tensor, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on this process's slice of a global batch of `global_batch` samples.

        Returns the slice's summed loss and number correct as device tensors (no host sync).
        """
        x, y = self._to_device(x), y.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self._train_forward(x)
            loss_sum = self.criterion(logits.float(), y)
        loss = loss_sum * (self.step_world / global_batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        return loss_sum.detach(), (logits.detach().argmax(1) == y).sum()

    def _zero_sums(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Loss and correct-count accumulators on the device (summed without host syncs), and a count."""
        return (torch.zeros((), dtype=torch.float64, device=self.device),
                torch.zeros((), dtype=torch.int64, device=self.device), 0)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split; the metrics are summed over every process."""
        torch.manual_seed(mix_seed(self.config.seed, epoch, self.world.rank))  # dropout and the like
        self.model.train()
        for m in self.frozen_norms:
            m.eval()
        if self.features:
            self.model.eval()
            self.head.train()
        loss_acc, correct_acc, count = self._zero_sums()
        seen: list[torch.Tensor] = []
        batches = zip(self._train_batches(epoch), self.sampler.global_batch_sizes(), strict=True)
        for step, ((x, y, idx), global_batch) in enumerate(
                progress_bar(batches, f"epoch {epoch}", total=len(self.sampler))):
            lr = self.scheduler.get_last_lr()[0]
            loss_sum, correct = self.step(x, y, global_batch)
            if self.step_world == 1 and (step % self.nan_check_every == 0) and not bool(torch.isfinite(loss_sum)):
                raise TrainingDiverged(f"loss became {float(loss_sum)} at epoch {epoch}, step {step} (lr {lr:.3g}); "
                                       "the checkpoints of the last complete epoch are kept — lower --lr and "
                                       "start again, or --resume", field="lr")
            loss_acc += loss_sum
            correct_acc += correct
            count += len(y)
            seen.append(idx)
        self.epoch_samples = torch.cat(seen).tolist() if seen else []
        totals = torch.stack([loss_acc, correct_acc.double(), torch.tensor(float(count), dtype=torch.float64,
                                                                           device=self.device)])
        # features mode: every process ran the same steps on the whole cache; nothing to sum
        loss_sum, correct, total = (self.world.all_reduce_sum(totals) if self.step_world > 1 else totals.cpu()).tolist()
        if not math.isfinite(loss_sum):  # processes step in lockstep: only the reduced sum may stop them all
            raise TrainingDiverged(f"non-finite loss in epoch {epoch} (lr {self.scheduler.get_last_lr()[0]:.3g}); "
                                   "the checkpoints of the last complete epoch are kept — lower --lr", field="lr")
        return {"train_loss": loss_sum / max(1, total), "train_accuracy": correct / max(1, total)}

    @torch.no_grad()
    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """Loss and accuracy over `dataset` (images, or cached embeddings in features mode), each
        process evaluating every N-th sample and the sums reduced over all of them."""
        self.model.eval()
        embedded = isinstance(dataset, TensorDataset)
        loss_acc, correct_acc, count = self._zero_sums()
        for x, y in self._eval_batches(dataset):
            x, y = self._to_device(x), y.to(self.device)
            with self._autocast():
                if embedded:
                    out = self.head(x)
                    logits = (torch.flatten(out, 1) if self.bb.head.flatten else out).float()
                else:
                    logits = self.model(x).float()
            loss_acc += nn.functional.cross_entropy(logits, y, reduction="sum")
            correct_acc += (logits.argmax(1) == y).sum()
            count += len(y)
        totals = torch.stack([loss_acc, correct_acc.double(), torch.tensor(float(count), dtype=torch.float64,
                                                                           device=self.device)])
        loss_sum, correct, total = self.world.all_reduce_sum(totals).tolist()
        return {"loss": loss_sum / max(1, total), "accuracy": correct / max(1, total)}

    def fit(self, meta: RunMeta, *, resume: bool = False) -> list[dict[str, Any]]:
        """Run the remaining epochs. Rank 0 writes the checkpoints and logs; the others wait for it."""
        world = self.world
        history: list[dict[str, Any]] = []
        best: dict[str, Any] = {"epoch": -1, "val_accuracy": -1.0, "val_loss": math.inf}
        start = 0
        if resume:
            state = world.on_main(lambda: load_resume(self.run, self.model))
            world.broadcast_module(self.model)
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            if self.scaler is not None and state.scaler:
                self.scaler.load_state_dict(state.scaler)
            history, best, start = state.history, state.best, state.epoch + 1
            log.info("resuming %s after epoch %d", self.run, state.epoch)
        log.info("training on %s (%s), %d process%s", self.device,
                 str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
                 world.world_size, "es" if world.distributed else "")
        for epoch in range(start, self.config.epochs):
            if epoch - best["epoch"] > self.config.patience and best["epoch"] >= 0:
                log.info("early stop: no validation improvement for %d epochs", self.config.patience)
                break
            t0 = time.perf_counter()
            row = {"epoch": epoch, **self.train_epoch(epoch)}
            val = self.evaluate(self.val_data)
            row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], lr=self.scheduler.get_last_lr()[0],
                       seconds=round(time.perf_counter() - t0, 3))
            history.append(row)
            improved = (val["accuracy"], -val["loss"]) > (best["val_accuracy"], -best["val_loss"])
            if improved:
                best = {"epoch": epoch, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}
                meta.metrics = {"best_epoch": epoch, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}
            shards = world.gather_objects(self.epoch_samples) if world.distributed and not self.features else None
            if world.is_main:
                if improved:
                    save_model(self.run, self.model, meta)
                save_resume(self.run, self.model, ResumeState(
                    epoch=epoch, best=best, history=history, optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict() if self.scaler else None))
                write_text(self.run / "metrics.jsonl", "".join(_jsonl(r) for r in history))
                if world.distributed:
                    self._write_shards(epoch, shards)
            world.barrier()
            log.info("epoch %d: loss %.4f train %.3f val %.3f%s", epoch, row["train_loss"], row["train_accuracy"],
                     val["accuracy"], " *" if improved else "")
        return history

    def _write_shards(self, epoch: int, ranks: list[list[int]] | None) -> None:
        """Which training samples (indices into the scanned train split) each process read.

        Features mode: which samples each process embedded (the head epochs then use the whole cache
        everywhere). Otherwise: what each process stepped on in the latest epoch.
        """
        record: dict[str, Any] = {"world_size": self.world.world_size, "train_samples": len(self.splits.train)}
        if self.features:
            record["embedding"] = self.embedding_shards
        else:
            record["epoch"] = {"index": epoch, "ranks": ranks}
        write_json(self.run / SHARDS_FILE, record)


def _jsonl(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True) + "\n"


#: what a run folder holds before its first epoch ends: such a folder may be started again in place
_BEFORE_FIRST_EPOCH = frozenset({"train_config.json", "split.json", "shards.json", "edgetransfer.log"})

#: settings that change how fast a run goes, not what it computes: a run may resume with others
_SPEED_ONLY = ("num_workers", "compile")


def check_run_folder(data: str | Path, run: Path, config: TrainConfig, *, resume: bool) -> None:
    """Refuse to overwrite a run, to resume one made with other settings, or an output folder that
    overlaps the dataset (exit 2 each).

    Overlap both ways: a run inside the dataset becomes a class of the next training (or its
    parity.png a training image of one), and a dataset inside the run is deleted with it."""
    data_root, out = Path(data).resolve(), run.resolve()
    if out == data_root or out.is_relative_to(data_root) or data_root.is_relative_to(out):
        raise UsageError(f"the output folder overlaps the dataset {data_root}; pick an --out outside it "
                         "(and not around it)", path=run)
    if run.exists() and not run.is_dir():
        raise UsageError("exists and is not a folder; pick a new --out", path=run)
    config_file = run / "train_config.json"
    if resume:
        if not config_file.exists():
            raise UsageError("cannot resume: no train_config.json here", path=run)
        saved, wanted = json.loads(config_file.read_text()), config_record(data, config)
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k) and k not in _SPEED_ONLY)
        if diff:
            raise UsageError(f"--resume with different settings than the interrupted run: {', '.join(diff)}",
                             path=config_file)
    elif run.exists() and any(run.iterdir()):
        left = {p.name for p in run.iterdir()}
        if left <= _BEFORE_FIRST_EPOCH:  # a run that failed before its first epoch: nothing to keep
            log.info("%s holds a run that never finished an epoch (%s); starting it again in place",
                     run, ", ".join(sorted(left)))
            for name in left - {"edgetransfer.log"}:
                (run / name).unlink()
            return
        raise UsageError("output folder is not empty; pick a new --out, or pass --resume to continue it", path=run)


def train(data: str | Path, out: str | Path, config: TrainConfig = TrainConfig(), *, resume: bool = False) -> TrainResult:
    """Adapt `config.backbone` to the ImageFolder tree at `data`; write the run folder `out`.

    The run holds `model.safetensors` + `meta.json` (best validation epoch), `metrics.jsonl`,
    `split.json` and resumable checkpoints. With `resume=True` an interrupted run continues from its
    last completed epoch with the same config. Started by torchrun with several processes, this
    trains with DistributedDataParallel; rank 0 writes the run (plus `shards.json`), every process
    returns the same result.
    """
    with world_session(config.device) as world:
        return _train(data, Path(out), config, resume, world)


def _train(data: str | Path, run: Path, config: TrainConfig, resume: bool, world: World) -> TrainResult:
    world.on_main(lambda: check_run_folder(data, run, config, resume=resume))
    splits = scan_dataset(data, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed,
                          skip_bad=config.skip_bad_images)
    require_trainable(splits, config.batch_size)
    torch.manual_seed(config.seed)
    bb = create(config.backbone, len(splits.classes), weights=config.weights, img_size=config.img_size,
                resize=RESIZE_POLICIES[config.resize], normalization=config.normalization)
    log.info("input %dx%d, resize %s, mean %s std %s — from %s", bb.input_spec.height, bb.input_spec.width,
             config.resize, list(bb.input_spec.mean), list(bb.input_spec.std), bb.spec_source)
    if world.is_main:
        run.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json(run / "train_config.json", config_record(data, config))
        write_json(run / "split.json", splits.record)
    meta = RunMeta(classes=splits.classes, input_spec=bb.input_spec, backbone=config.backbone, weights=bb.weights,
                   mode=config.mode, data={"root": str(Path(data).resolve()), "hash": dataset_hash(splits),
                                           "counts": splits.counts(), "seed": config.seed,
                                           "val_fraction": config.val_fraction, "test_fraction": config.test_fraction,
                                           "skipped": [r["path"] for r in splits.record.get("skipped", [])]},
                   train_config={**asdict(config), "augmentation": augmentation(config.augment).to_dict()},
                   spec_source=bb.spec_source)
    trainer = Trainer(splits, bb, config, run, world=world)
    history = trainer.fit(meta, resume=resume)

    # evaluate the best epoch's weights on the held-out test split and record it in the meta
    def load_best() -> RunMeta:
        saved = RunMeta.load(run / META_FILE)
        load_weights(trainer.model, run / MODEL_FILE, sha256=saved.weights_sha256)
        return saved

    best_meta = world.on_main(load_best)
    world.broadcast_module(trainer.model)
    test = trainer.evaluate(EvalImages(splits.test, bb.input_spec)) if splits.test else {}
    best_meta.metrics.update({"test_accuracy": test.get("accuracy"), "test_samples": len(splits.test),
                              "epochs_run": len(history)})
    if trainer.features:
        best_meta.metrics["embedding_seconds"] = trainer.embedding_seconds
    # next to the accuracy: chance and majority-class baselines (on val when there is no test split)
    from ..baselines import assess, summary_line

    split = "test" if splits.test else "val"
    counts = splits.counts()
    baselines = assess(best_meta.metrics.get(f"{split}_accuracy"), splits.classes, counts["train"], counts[split],
                       split=split)
    best_meta.metrics["baselines"] = baselines
    if world.is_main:
        best_meta.save(run / META_FILE)
        log.info("%s accuracy vs baselines: %s", split, summary_line(baselines))
        if baselines["warning"]:
            log.warning("WARNING: %s", baselines["warning"])
    world.barrier()
    return TrainResult(run=run, meta=best_meta, history=history)


def config_record(data: str | Path, config: TrainConfig) -> dict[str, Any]:
    """What train_config.json holds, as JSON gives it back (tuples as lists), so records compare equal."""
    return json.loads(json.dumps({"data": str(Path(data).resolve()), **asdict(config)}))
