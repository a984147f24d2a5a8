"""Distributed training, for real: torchrun starts 2 CPU processes that talk over gloo.

Nothing about torch.distributed is mocked. Each test trains the same tiny run twice, in one process and
under torchrun with 2, and compares what the two wrote. The data is a learnable task (4 colours, 8
training images each, 40 px) so that accuracy means something: on the conftest's subtle defects a
2-epoch model sits at chance, where a BatchNorm difference flips predictions at random.

Both modes must match the single-process run to float precision. With `--batch-size 8` each of
the 2 processes takes 4 images of every global batch of 8 and DistributedDataParallel averages their
gradients, so both runs take the same steps on the same images with the same augmentations. The one
thing that could differ is BatchNorm's batch statistics (4 images per process instead of 8: there is
no SyncBatchNorm on the CPU; on CUDA the trainer converts to it), and on 20 test images that noise
moved the finetuned run's accuracy by 3 images on one CI machine and by none on another. So the
finetune test runs with `--bn frozen` (the default for pretrained weights on small sets, where it
applies anyway) and compares the weights themselves; features mode has a frozen backbone in eval mode
and every process trains the head on the gathered cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from edgetransfer.adapt.train import TrainConfig, train
from edgetransfer.cli import main

CONFIG = dict(backbone="resnet18", weights="none", epochs=2, img_size=32, batch_size=8)
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40), "yellow": (210, 200, 40)}
COUNTS = {"train": 8, "val": 3, "test": 5}


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    """DATA/{train,val,test}/<colour>/*.png: noisy, unevenly lit patches of four colours."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in COUNTS.items():
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.array(rgb) * rng.uniform(0.6, 1.2) + rng.normal(0, 40, (40, 40, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def _args(data: Path, out: Path, **overrides) -> list[str]:
    args = ["train", str(data), "--out", str(out)]
    for key, value in {**CONFIG, **overrides}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    # one thread per process on small CI machines; the processes talk over loopback
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGETRANSFER_PROGRESS": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def test_two_processes_finetune_on_disjoint_shards_and_match_one_process(colour_data, tmp_path):
    overrides = dict(mode="finetune", bn="frozen")
    single = train(colour_data, tmp_path / "single", TrainConfig(**CONFIG, **overrides))
    out = tmp_path / "ddp"
    proc = _run([sys.executable, "-m", "edgetransfer", *_args(colour_data, out, **overrides), "--nproc", "2"])

    # every epoch, the two processes stepped on disjoint halves of the training split, covering it
    shards = json.loads((out / "shards.json").read_text())
    assert shards["world_size"] == 2 and shards["train_samples"] == 32
    assert shards["epoch"]["index"] == CONFIG["epochs"] - 1
    rank0, rank1 = (set(r) for r in shards["epoch"]["ranks"])
    assert len(rank0) == len(rank1) == 16 and not rank0 & rank1 and rank0 | rank1 == set(range(32))

    # one run folder, one checkpoint set, written by rank 0 alone (no per-rank copies, no temporaries)
    assert _files(out) == {"meta.json", "model.safetensors", "metrics.jsonl", "split.json", "train_config.json",
                           "shards.json", "checkpoints/last.json",  # + the last two epochs' checkpoints
                           *(f"checkpoints/epoch-{e}.{x}" for e in range(CONFIG["epochs"])[-2:]
                             for x in ("safetensors", "state.pt"))}
    assert _files(single.run) | {"shards.json"} == _files(out)
    # ...and one voice: rank 1 logs only warnings and prints no summary
    assert proc.stderr.count("epoch 0:") == 1 and proc.stdout.count("test accuracy") == 1, proc.stderr

    ddp_meta = json.loads((out / "meta.json").read_text())
    ddp_acc, single_acc = ddp_meta["metrics"]["test_accuracy"], single.test_accuracy
    assert ddp_meta["metrics"]["test_samples"] == 20 and ddp_meta["metrics"]["epochs_run"] == CONFIG["epochs"]
    assert single_acc >= 0.9, "the single-process run must learn the task, or the comparison means nothing"
    # the same optimisation: same number of steps, same schedule, the same weights (no DDP "module." prefix)
    assert [r["lr"] for r in _rows(out)] == pytest.approx([r["lr"] for r in _rows(single.run)])
    a, b = load_file(str(single.run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-3, msg=key)
    assert ddp_acc == single_acc


def test_two_processes_in_features_mode_embed_disjoint_shards_and_match_exactly(colour_data, tmp_path):
    overrides = dict(mode="features", epochs=3, lr=0.02)
    single = train(colour_data, tmp_path / "single", TrainConfig(**{**CONFIG, **overrides}))
    out = tmp_path / "ddp"
    # torchrun itself, as the README shows for several GPUs or machines
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
          "-m", "edgetransfer", *_args(colour_data, out, **overrides)])

    shards = json.loads((out / "shards.json").read_text())["embedding"]
    for split, n in (("train", 32), ("val", 12)):
        rank0, rank1 = (set(r) for r in shards[split])
        assert not rank0 & rank1 and rank0 | rank1 == set(range(n)), split

    a, b = load_file(str(single.run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4, msg=key)
    for x, y in zip(_rows(single.run), _rows(out), strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-4)
        assert x["val_accuracy"] == y["val_accuracy"]
    ddp_acc = json.loads((out / "meta.json").read_text())["metrics"]["test_accuracy"]
    assert ddp_acc == single.test_accuracy


def test_nproc_refuses_bad_usage_before_starting_torchrun(colour_data, tmp_path, monkeypatch):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, [*_args(colour_data, busy), "--nproc", "2"])
    assert result.exit_code == 2 and "not empty" in result.output, result.output

    for var, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)
    result = CliRunner().invoke(main, [*_args(colour_data, tmp_path / "new"), "--nproc", "2"])
    assert result.exit_code == 2 and "nproc" in result.output, result.output


@pytest.mark.parametrize("n, batch, world", [(32, 8, 2), (21, 8, 2), (23, 6, 3), (17, 8, 1)])
def test_ranks_split_each_global_batch_of_the_single_process_run(n, batch, world):
    from edgetransfer.adapt.loader import GlobalBatchSampler

    def batches(rank: int, size: int, epoch: int) -> list[list[int]]:
        sampler = GlobalBatchSampler(n, batch, seed=3, rank=rank, world_size=size)
        sampler.set_epoch(epoch)
        return list(sampler)

    for epoch in (0, 1):
        single = batches(0, 1, epoch)
        per_rank = [batches(r, world, epoch) for r in range(world)]
        assert all(len(b) == len(per_rank[0]) for b in per_rank)  # every rank takes the same number of steps
        for step, whole in enumerate(single[:len(per_rank[0])]):
            parts = [per_rank[r][step] for r in range(world)]
            assert sorted(i for p in parts for i in p) == sorted(whole)  # the same global batch, split
            assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 2
    assert batches(0, 1, 0) != batches(0, 1, 1) and batches(0, 1, 1) == batches(0, 1, 1)
