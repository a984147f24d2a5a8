"""Shared, expensive fixtures for the spine tests: one tiny generated dataset and one trained +
exported run, made once per session so every test file reuses them.

Everything runs for real (torch, ONNX export, ONNX Runtime) on tiny data: 5 classes of 40x40
synthetic surfaces, 4 train / 2 val / 2 test images per class, resnet18 at 32 px, 2 epochs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

# no progress bars in test output (also inherited by CLI subprocesses started from the tests)
os.environ["EDGETRANSFER_PROGRESS"] = "0"

#: The configuration of the shared run. The CLI's defaults (lr, mode, seed, patience, ...) are the
#: TrainConfig defaults, so `cli_train_args()` below trains exactly this run from the command line.
RUN_CONFIG = dict(backbone="resnet18", weights="none", mode="finetune", epochs=2, img_size=32, batch_size=8)
DATA_COUNTS = {"train": 4, "val": 2, "test": 2}
DATA_SIZE = 40


def cli_train_args(data: Path, out: Path, **overrides) -> list[str]:
    """`edgetransfer train` arguments equivalent to TrainConfig(**RUN_CONFIG, **overrides)."""
    cfg = {**RUN_CONFIG, **overrides}
    args = ["train", str(data), "--out", str(out)]
    for key, value in cfg.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("EDGETRANSFER_PROGRESS", "0")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A generated defects dataset in ImageFolder layout: DATA/{train,val,test}/<class>/*.png."""
    from edgetransfer.data.synthetic import SyntheticConfig, generate_dataset

    root = tmp_path_factory.mktemp("data") / "defects"
    generate_dataset(root, SyntheticConfig(task="defects", counts=dict(DATA_COUNTS), size=DATA_SIZE, seed=0))
    return root


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """One finished training run (a TrainResult). Tests must not modify its folder: copy it first."""
    from edgetransfer.adapt.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "resnet18"
    return train(tiny_data, out, TrainConfig(**RUN_CONFIG))


@pytest.fixture(scope="session")
def exported_run(trained_run) -> Path:
    """The shared run with model.onnx exported next to its weights."""
    from edgetransfer.export import export_onnx

    export_onnx(trained_run.run)
    return trained_run.run


@pytest.fixture
def run_copy(exported_run, tmp_path) -> Path:
    """A private copy of the exported run (only what export/validate read), safe to modify."""
    dst = tmp_path / "run"
    dst.mkdir()
    for name in ("meta.json", "model.safetensors", "model.onnx", "train_config.json", "split.json"):
        shutil.copy2(exported_run / name, dst / name)
    return dst


#: targets the shared shipped run is compiled and validated for (OpenVINO and ONNX Runtime)
SHIPPED_TARGETS = ("intel-cpu", "x86-onnxruntime")


@pytest.fixture(scope="session")
def shipped_run(exported_run, tmp_path_factory) -> Path:
    """A copy of the shared run quantized (quick calibration), compiled and validated for
    SHIPPED_TARGETS, and quantized for jetson-orin-nano (whose engine is built on the device).
    Tests must not modify it: bundle it, or copy it first."""
    from edgetransfer.stages import compile_run, quantize_run
    from edgetransfer.validate import validate

    run = tmp_path_factory.mktemp("shipped") / "run"
    run.mkdir()
    for name in ("meta.json", "model.safetensors", "model.onnx", "train_config.json", "split.json"):
        shutil.copy2(exported_run / name, run / name)
    # a barely trained model on 30 quick-calibration images: what the tests look at is what comes after
    # quantize, so no fp32-layer search (test_quantize and test_stages test the search) and its INT8
    # file is compiled even where it misses the gates (test_stages checks that compile refuses that)
    for target in SHIPPED_TARGETS:
        quantize_run(run, target, calib="quick", max_fallback_layers=0)
        compile_run(run, target, allow_failed=True)
        validate(run, target=target)
    quantize_run(run, "jetson-orin-nano", calib="quick", max_fallback_layers=0)
    return run


@pytest.fixture(scope="session")
def bundles(shipped_run, tmp_path_factory) -> dict[str, Path]:
    """A bundle folder per shipped target, plus an archive (`<target>.tar.gz`). Read-only: copy to modify."""
    from edgetransfer.bundle import write_bundle

    out = tmp_path_factory.mktemp("bundles")
    made = {}
    for target in SHIPPED_TARGETS:
        result = write_bundle(shipped_run, target, out / target, archive=True, allow_failed=True)
        made[target], made[f"{target}.tar.gz"] = result.folder, result.archive
    return made


@pytest.fixture(scope="session")
def residual_onnx(tmp_path_factory) -> tuple[Path, list, Any]:
    """A small inverted-residual network (1x1 → depthwise 3x3 → 1x1, ReLU6, residual Add: the blocks of
    EfficientNet-Lite and MobileNet), random seeded weights, exported with a dynamic batch.

    Returns (fp32 ONNX path, calibration batches, 64 test inputs)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.expand, self.dw = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
            self.project = nn.Conv2d(2 * c, c, 1)

        def forward(self, x):
            return x + self.project(torch.clamp(self.dw(torch.clamp(self.expand(x), 0, 6)), 0, 6))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.blocks = nn.Conv2d(3, 16, 3, padding=1), nn.Sequential(*[Block(16) for _ in range(4)])
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            return self.fc(self.blocks(torch.clamp(self.stem(x), 0, 6)).mean((2, 3)))

    torch.manual_seed(0)
    calibration, x = torch.randn(64, 3, 24, 24), torch.randn(64, 3, 24, 24).numpy()
    path = tmp_path_factory.mktemp("residual") / "residual.onnx"
    torch.onnx.export(Net().eval(), (calibration[:1],), str(path), dynamo=True, opset_version=18,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    return path, [calibration[:32].numpy(), calibration[32:].numpy()], x
