"""Faults of the machine, not of the input: a command killed with SIGKILL half-way, a disk that fills
up, an output folder that is read-only. Real subprocesses, a real kill -9, a real (tiny) tmpfs."""

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

from edgetransfer.fsutil import sha256_file

RUN_FILES = ("meta.json", "model.safetensors", "train_config.json", "split.json")


def _copy(src: Path, dst: Path, *extra: str) -> Path:
    dst.mkdir(parents=True)
    for name in RUN_FILES + extra:
        shutil.copy2(src / name, dst / name)
    return dst


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetransfer", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def _kill_when(args: list[str], ready, *, timeout: float = 120) -> None:
    """Start the command, SIGKILL it as soon as `ready()` holds (mid-work), and wait for it to die."""
    proc = subprocess.Popen([sys.executable, "-m", "edgetransfer", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the command finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _untimed(path: Path) -> dict:
    """A JSON record without its wall-clock durations (the only thing a rerun may change)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if "seconds" not in k}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj

    return strip(json.loads(path.read_text()))


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def test_kill_9_during_export_and_quantize_then_the_same_command_completes_identically(exported_run, tmp_path):
    reference = _copy(exported_run, tmp_path / "reference", "model.onnx")
    done = _cli("quantize", str(reference), "--target", "x86-onnxruntime", "--calib", "quick")
    assert done.returncode in (0, 1), done.stderr  # 1: over the accuracy budget, still written

    run = _copy(exported_run, tmp_path / "killed")
    # export: killed once its temporary ONNX file exists, i.e. while it is being written
    _kill_when(["export", str(run)], lambda: bool(list(run.glob(".model.onnx.*.tmp"))))
    assert not (run / "model.onnx").exists() and _temporaries(run)  # a leftover, but nothing under the final name
    assert _cli("export", str(run)).returncode == 0
    assert not _temporaries(run)  # the orphan of the killed writer was swept by the rerun

    # quantize: killed after it has written its calibration record, during calibration/quantization
    out = run / "x86-onnxruntime"
    _kill_when(["quantize", str(run), "--target", "x86-onnxruntime", "--calib", "quick"],
               lambda: (out / "calibration.json").exists())
    assert not (out / "model.int8.onnx").exists()
    again = _cli("quantize", str(run), "--target", "x86-onnxruntime", "--calib", "quick")
    assert again.returncode == done.returncode, again.stderr
    assert sha256_file(out / "model.int8.onnx") == sha256_file(reference / "x86-onnxruntime" / "model.int8.onnx")
    assert _untimed(out / "quantization.json") == _untimed(reference / "x86-onnxruntime" / "quantization.json")
    assert not _temporaries(run)


def _unshare_available() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a private tmpfs here ({probe.stderr.strip()})"


def test_disk_full_and_read_only_outputs_are_exit_2_naming_the_path(exported_run, tmp_path):
    if (reason := _unshare_available()) is not None:
        pytest.skip(f"needs a private tmpfs to fill or make read-only: {reason}")
    run = _copy(exported_run, tmp_path / "run")
    size_kb = sum(p.stat().st_size for p in run.iterdir()) // 1024 + 2048  # room for the run, not for model.onnx
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
set -u
mount -t tmpfs -o size={size_kb}k tmpfs {mnt}
cp -a {run} {mnt}/run
sha256sum {mnt}/run/model.safetensors {mnt}/run/meta.json > {mnt}/../before.sha
{sys.executable} -m edgetransfer export {mnt}/run > {mnt}/../full.out 2>&1; echo "full rc=$?"
ls -a {mnt}/run > {mnt}/../full.ls
sha256sum -c {mnt}/../before.sha > /dev/null && echo "full intact"
mount -o remount,ro {mnt}
{sys.executable} -m edgetransfer export {mnt}/run > {mnt}/../ro.out 2>&1; echo "ro rc=$?"
sha256sum -c {mnt}/../before.sha > /dev/null && echo "ro intact"
"""
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "EDGETRANSFER_PROGRESS": "0"})
    status = proc.stdout
    full, ro = (tmp_path / "full.out").read_text(), (tmp_path / "ro.out").read_text()
    assert "full rc=2" in status, full
    assert "disk is full" in full and f"{mnt}/run" in full and "Traceback" not in full
    assert "full intact" in status
    listing = (tmp_path / "full.ls").read_text().split()
    assert "model.onnx" not in listing and not [n for n in listing if n.endswith(".tmp")]  # nothing half-written
    assert "ro rc=2" in status, ro
    assert "read-only" in ro and f"{mnt}/run" in ro and "Traceback" not in ro
    assert "ro intact" in status
