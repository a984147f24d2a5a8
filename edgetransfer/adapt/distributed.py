"""Data-parallel training through PyTorch's own engine: torchrun starts the processes,
`torch.distributed` connects them, DistributedDataParallel averages the gradients.

This module owns what training needs from that engine and nothing more: reading torchrun's
environment, opening and closing the process group (NCCL between GPUs, gloo between CPU processes),
the few collectives the trainer uses (sum, gather, broadcast), and the command that hands
`edgetransfer train --nproc N` to torchrun. There is no launcher or gradient exchange of our own.

Global rank 0 alone owns the run folder: it checks it, writes every file, and reads checkpoints back
and broadcasts them, so only the machine that holds rank 0 needs the folder (the data folder must be
on every machine). Every other rank learns about an error on rank 0 through `on_main`, so a bad
`--out` fails every process with the same message instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import EdgeTransferError, UsageError

T = TypeVar("T")

#: variables torchrun sets for every worker it starts
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """True in a process started by torchrun (or anything else that sets its environment)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def env_rank() -> int:
    """This process's global rank from torchrun's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class World:
    """Where this process stands among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- collectives (each is a no-op in a world of one) ------------------------------------------
    def all_reduce_sum(self, values: list[float | int] | torch.Tensor) -> torch.Tensor:
        """Sum a small float64 vector over ranks (epoch metrics: loss sum, correct, count)."""
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.cpu()

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._object_device)
        return box[0]

    def broadcast_module(self, module: nn.Module) -> None:
        """Overwrite every rank's parameters and buffers with rank 0's, in place."""
        if not self.distributed:
            return
        with torch.no_grad():
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def gather_rows(self, local: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Every rank's `local` (rows = first dimension; rank r has `counts[r]` rows), on every rank.

        `all_gather` needs equal shapes, so each rank pads to the longest shard and the padding is
        cut off again by the known counts: no sample is duplicated or lost.
        """
        if not self.distributed:
            return [local]
        longest = max(counts)
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: len(local)] = local.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [p[:n].cpu() for p, n in zip(parts, counts, strict=True)]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; every rank returns its result, or raises the error it raised.

        For work that touches the run folder (checks, reading checkpoints back): one process does it,
        and a typed error reaches every process instead of leaving the others blocked.
        """
        if not self.distributed:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except EdgeTransferError as exc:
                outcome = ("error", exc)
        kind, value = self.broadcast_object(outcome)
        if kind == "error":
            raise value
        return value

    @property
    def _object_device(self) -> torch.device:
        # NCCL moves pickled objects through the GPU; gloo keeps them on the CPU
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def pick_device(requested: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of this process: `auto` and `cuda` mean the GPU numbered by torchrun's LOCAL_RANK."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("CUDA was requested but no CUDA device is visible", field="device")
        if requested == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UsageError(f"process {local_rank} on this machine has no GPU of its own "
                                 f"({torch.cuda.device_count()} visible): start at most one process per GPU",
                                 field="device")
            return torch.device("cuda", local_rank)
        if world_size > 1:
            raise UsageError("with several processes each takes the GPU of its local rank: pass --device cuda, "
                             f"not {requested}", field="device")
    return torch.device(requested)


@contextlib.contextmanager
def world_session(requested_device: str) -> Iterator[World]:
    """This process's `World`; under torchrun with several processes, with the process group open.

    The group is closed again on the way out only if this call opened it (a caller that set up
    torch.distributed itself keeps its group).
    """
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield World(device=pick_device(requested_device))
        return
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(requested_device, local, size)
    opened = not dist.is_initialized()
    if opened:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    try:
        yield World(rank=rank, world_size=size, local_rank=local, device=device)
    finally:
        if opened:
            dist.destroy_process_group()


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """`python -m torch.distributed.run` starting `nproc` copies of `python -m edgetransfer ARGS` here.

    `--standalone` lets torchrun pick a free local rendezvous port, so two runs on one machine do not
    collide. Several machines use torchrun directly with its rendezvous flags (see the README).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "edgetransfer", *args]
