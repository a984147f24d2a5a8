"""Training throughput of edgetransfer's training step vs a plain hand-written PyTorch loop, in one run;
and features mode (embeddings cached once) vs running the frozen backbone every epoch.

    python benchmarks/train_throughput.py [--models resnet18 mobilenet_v3_large] [--size 224] [--batch 32]
        [--device auto|cpu|cuda] [--steps 20] [--repeats 3] [--compile] [--features-images 256] [--out FILE.json]

Step comparison: both sides start from the same random weights and take the same batches (random
images, already in host memory, pinned on CUDA) at the same precision and memory format — the ones
edgetransfer picks for the device (bf16/fp16 autocast and channels_last on CUDA, fp32 on the CPU).
edgetransfer's side is `Trainer.step`, exactly what `train()` runs per batch (its optimizer param
groups, warm-up/cosine schedule, label smoothing, on-device metric sums); the plain loop is the
textbook one: AdamW, cross-entropy, backward, step. Timed rounds alternate between the two so that
load from other processes hits both alike; each side's median round is reported, with the load
average before and after the run so contended figures can be recognised.

Features comparison: a generated image folder (random pixels; speed does not depend on content) is
trained in `features` mode — the frozen backbone embeds every image once (reported separately), then
each epoch trains the head on the cache — against the loop a user would otherwise write: every epoch,
decode and preprocess the same images, run the frozen backbone under no_grad, and train the head.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from edgetransfer.adapt.freeze import apply_mode
from edgetransfer.adapt.loader import EvalImages
from edgetransfer.adapt.train import TrainConfig, Trainer, amp_dtype, loader_workers
from edgetransfer.backbones import create
from edgetransfer.data.folder import scan_dataset

CLASSES = 5


def write_images(root: Path, per_class: dict[str, int], size: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """The hand-written loop: same model, batch, precision and memory format as edgetransfer's step."""

    def __init__(self, model: nn.Module, device: torch.device, compile_model: bool):
        self.device, self.dtype = device, amp_dtype(device)
        self.channels_last = device.type == "cuda"
        self.model = model.to(device).train()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
        self.loss = nn.CrossEntropyLoss()
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = self.loss(self.forward(x), y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()


def interleaved(contenders: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per round for each contender, alternating which goes first."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            contenders[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def step_throughput(name: str, args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    base = create(name, CLASSES, weights="none", img_size=args.size).model
    config = TrainConfig(backbone=name, weights="none", mode="finetune", img_size=args.size, batch_size=args.batch,
                         epochs=1000, device=str(device), num_workers=0, compile=args.compile)
    # the Trainer wants an image folder; its own data plays no part in the timed steps
    splits = scan_dataset(work / "tiny", verify=False)
    bb = create(name, CLASSES, weights="none", img_size=args.size)
    bb.model.load_state_dict(base.state_dict())
    trainer = Trainer(splits, bb, config, work / "run")
    trainer.model.train()
    plain = PlainLoop(copy.deepcopy(base), device, args.compile)

    pin = device.type == "cuda"
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, args.size, args.size, generator=gen),
                torch.randint(0, CLASSES, (args.batch,), generator=gen)) for _ in range(4)]
    if pin:
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]

    def run_trainer(steps: int) -> None:
        # as train_epoch does: sums stay on the device, one host sync at the end
        loss_acc = torch.zeros((), dtype=torch.float64, device=device)
        correct_acc = torch.zeros((), dtype=torch.int64, device=device)
        for i in range(steps):
            x, y = batches[i % len(batches)]
            loss, correct = trainer.step(x, y, args.batch)
            loss_acc += loss
            correct_acc += correct
        loss_acc.item()

    def run_plain(steps: int) -> None:
        for i in range(steps):
            plain.step(*batches[i % len(batches)])

    interleaved({"edgetransfer": lambda: run_trainer(args.warmup), "plain": lambda: run_plain(args.warmup)}, 2, device)
    times = interleaved({"edgetransfer": lambda: run_trainer(args.steps), "plain": lambda: run_plain(args.steps)},
                        2 * args.repeats, device)
    ips = {k: args.steps * args.batch / statistics.median(v) for k, v in times.items()}
    return {"model": name, "size": args.size, "batch": args.batch,
            "precision": str(amp_dtype(device) or "fp32").replace("torch.", ""),
            "channels_last": device.type == "cuda", "compile": args.compile,
            "edgetransfer_img_s": ips["edgetransfer"], "plain_img_s": ips["plain"],
            "ratio": ips["edgetransfer"] / ips["plain"],
            "rounds_s": {k: [round(t, 4) for t in v] for k, v in times.items()}}


def features_speedup(name: str, args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    data = work / f"features-{args.size}"
    if not data.exists():
        per_class = max(1, args.features_images // CLASSES)
        write_images(data, {"train": per_class, "val": max(1, per_class // 8)}, args.size)
    splits = scan_dataset(data, verify=False)
    # the loop without a cache: decode, preprocess and run the frozen backbone every epoch
    torch.manual_seed(0)
    frozen = create(name, CLASSES, weights="none", img_size=args.size)
    apply_mode(frozen.model, frozen.head, "features")
    model = frozen.model.to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    head = model.get_submodule(frozen.head.path)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    dtype = amp_dtype(device)
    loader = torch.utils.data.DataLoader(EvalImages(splits.train, frozen.input_spec), batch_size=args.batch, shuffle=True,
                                         num_workers=loader_workers(None, device), pin_memory=device.type == "cuda")
    captured: dict[str, torch.Tensor] = {}
    hook = head.register_forward_pre_hook(lambda _m, inp: captured.__setitem__("x", inp[0].detach()))

    def frozen_epoch() -> None:
        head.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                with torch.no_grad():
                    model(x)
                loss = nn.functional.cross_entropy(head(captured["x"]), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    frozen_epoch()  # warm-up (thread pools, allocator) before timing the one-off embedding pass
    config = TrainConfig(backbone=name, weights="none", mode="features", img_size=args.size, batch_size=args.batch,
                         epochs=args.epochs, device=str(device))
    torch.manual_seed(0)
    bb = create(name, CLASSES, weights="none", img_size=args.size)
    sync(device)
    t0 = time.perf_counter()
    trainer = Trainer(splits, bb, config, work / "features-run")  # embeds train (and the small val split) once
    sync(device)
    cache_s = time.perf_counter() - t0

    epoch = iter(range(10**6))
    times = interleaved({"features": lambda: trainer.train_epoch(next(epoch)), "frozen backbone": frozen_epoch},
                        2 * args.repeats, device)
    hook.remove()
    feat_s, frozen_s = statistics.median(times["features"]), statistics.median(times["frozen backbone"])
    e = args.epochs
    return {"model": name, "size": args.size, "images": len(splits.train), "epochs_for_total": e,
            "cache_once_s": cache_s, "features_epoch_s": feat_s, "frozen_backbone_epoch_s": frozen_s,
            "per_epoch_speedup": frozen_s / feat_s,
            "speedup_over_epochs_incl_cache": e * frozen_s / (cache_s + e * feat_s)}


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_large"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20, help="Steps per timed round.")
    ap.add_argument("--warmup", type=int, default=3, help="Untimed steps per side first (and compilation).")
    ap.add_argument("--repeats", type=int, default=3, help="Timed rounds per side (x2, alternating).")
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides.")
    ap.add_argument("--features-images", type=int, default=256, help="Training images for the features comparison.")
    ap.add_argument("--epochs", type=int, default=10, help="Epochs for the features total (cache included).")
    ap.add_argument("--skip-features", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON.")
    args = ap.parse_args()
    os.environ.setdefault("EDGETRANSFER_PROGRESS", "0")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both sides alike
    load_before = os.getloadavg()
    steps, feats = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_images(work / "tiny", {"train": 2, "val": 1}, 16)
        for name in args.models:
            steps.append(step_throughput(name, args, device, work))
            r = steps[-1]
            print(f"{name}: edgetransfer {r['edgetransfer_img_s']:.1f} img/s, plain {r['plain_img_s']:.1f} img/s, "
                  f"ratio {r['ratio']:.3f}", file=sys.stderr, flush=True)
            if not args.skip_features:
                feats.append(features_speedup(name, args, device, work))
                f = feats[-1]
                print(f"{name}: features epoch {f['features_epoch_s']:.3f} s, frozen backbone epoch "
                      f"{f['frozen_backbone_epoch_s']:.3f} s, x{f['per_epoch_speedup']:.1f}", file=sys.stderr, flush=True)
    result = {"machine": machine(device), "load_average_before_after": [load_before, os.getloadavg()],
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "steps": steps, "features": feats}
    print(f"\n{result['machine']['gpu'] or result['machine']['cpu']}, torch {torch.__version__}, "
          f"load average before/after {load_before[0]:.2f}/{os.getloadavg()[0]:.2f}\n")
    print("| model | size | batch | precision | edgetransfer img/s | plain loop img/s | ratio |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in steps:
        print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['precision']}{' +compile' if r['compile'] else ''} "
              f"| {r['edgetransfer_img_s']:.1f} | {r['plain_img_s']:.1f} | {r['ratio']:.3f} |")
    if feats:
        print("\n| model | images | embed once | features epoch | frozen-backbone epoch | per epoch | "
              f"{args.epochs} epochs incl. cache |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for f in feats:
            print(f"| {f['model']} | {f['images']} | {f['cache_once_s']:.2f} s | {f['features_epoch_s'] * 1e3:.1f} ms "
                  f"| {f['frozen_backbone_epoch_s']:.2f} s | {f['per_epoch_speedup']:.0f}x "
                  f"| {f['speedup_over_epochs_incl_cache']:.1f}x |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
