"""Training under faults: a diverging loss, damaged checkpoints, SIGTERM mid-run, unreadable images
skipped within the bound — and in each case the run on disk stays usable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edgetransfer.adapt.checkpoint import load_resume, save_weights
from edgetransfer.adapt.train import TrainConfig, TrainingDiverged, train
from edgetransfer.backbones import create
from edgetransfer.cli import main
from edgetransfer.errors import IntegrityError, UsageError
from tests.conftest import RUN_CONFIG, cli_train_args


def test_a_diverging_loss_stops_at_its_step_and_writes_no_nan_weights(tiny_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_data, out, TrainConfig(**{**RUN_CONFIG, "lr": 1e30, "warmup_epochs": 0}))
    message = str(info.value)
    assert info.value.exit_code == 2 and "at epoch 0, step" in message and "lr 1e+30" in message
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints" / "last.json").exists()

    model = create("resnet18", 5, weights="none", img_size=32).model
    with torch.no_grad():
        model.fc.bias[0] = float("nan")
    with pytest.raises(UsageError, match="refusing to save: .*non-finite weights .* in fc.bias"):
        save_weights(model, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.onnx", "x86-*", "intel-*", "jetson-*"))
    return dst


def _flip(path: Path, offset_from_end: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_bit_or_a_truncated_checkpoint_is_exit_4_naming_the_file(trained_run, tmp_path):
    run = _copy_run(trained_run.run, tmp_path / "flipped")
    _flip(run / "model.safetensors")  # inside the data: safetensors itself would not notice
    result = CliRunner().invoke(main, ["export", str(run)])
    assert result.exit_code == 4, result.output
    assert "model.safetensors" in result.output and "sha256" in result.output and not (run / "model.onnx").exists()

    run = _copy_run(trained_run.run, tmp_path / "truncated")
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = CliRunner().invoke(main, ["export", str(run)])
    assert result.exit_code == 4 and "model.safetensors" in result.output


def test_resume_falls_back_to_the_newest_complete_checkpoint(trained_run, tmp_path):
    run = _copy_run(trained_run.run, tmp_path / "run")
    index = json.loads((run / "checkpoints" / "last.json").read_text())
    newest = index["epoch"]
    assert index["previous"]["epoch"] == newest - 1  # the epoch before is kept until the next is complete
    model = create("resnet18", 5, weights="none", img_size=32).model
    assert load_resume(run, model).epoch == newest

    _flip(run / "checkpoints" / f"epoch-{newest}.safetensors")
    state = load_resume(run, model)
    assert state.epoch == newest - 1 and len(state.history) == newest

    _flip(run / "checkpoints" / f"epoch-{newest - 1}.state.pt", 10)
    with pytest.raises(IntegrityError) as info:
        load_resume(run, model)
    assert info.value.exit_code == 4 and f"epoch-{newest}.safetensors" in str(info.value)


def test_sigterm_mid_training_is_exit_143_and_resume_finishes_with_bad_images_skipped(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "test").rglob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:50])  # truncated, in the test split
    out = tmp_path / "run"
    args = [*cli_train_args(data, out, epochs=4), "--skip-bad-images", "0.1"]
    index = out / "checkpoints" / "last.json"
    proc = subprocess.Popen([sys.executable, "-m", "edgetransfer", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "EDGETRANSFER_PROGRESS": "0"})
    deadline = time.monotonic() + 240
    while not index.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr and "--resume" in stderr
    assert json.loads(index.read_text())["epoch"] < 3

    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    skipped = json.loads((out / "split.json").read_text())["skipped"]
    assert [s["path"] for s in skipped] == [victim.relative_to(data).as_posix()]
    assert "cannot read image" in skipped[0]["reason"] or "truncated" in skipped[0]["reason"]
    assert json.loads((out / "meta.json").read_text())["metrics"]["epochs_run"] == 4
    # later stages rescan the dataset without the skipped file
    assert CliRunner().invoke(main, ["export", str(out)]).exit_code == 0
    validated = CliRunner().invoke(main, ["validate", str(out)])
    assert validated.exit_code in (0, 1), validated.output
