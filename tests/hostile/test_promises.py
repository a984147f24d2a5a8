"""The broken promises of issue 12, rows 1-3: what ships must be what was validated, `--force` replaces
only a previous bundle, and a run never lands inside its own dataset. Real runs, real CLI; every test
hashes the folders it could harm before and after."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetransfer.cli import main
from edgetransfer.fsutil import sha256_file

from ..conftest import cli_train_args


def tree_digest(root: Path) -> str:
    """One hash over every path and file content under `root` (nothing lost, nothing half-written),
    but the log every command appends to (`RUN/edgetransfer.log`)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.name == "edgetransfer.log":
            continue
        h.update(path.relative_to(root).as_posix().encode())
        if path.is_file():
            h.update(sha256_file(path).encode())
    return h.hexdigest()


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def shipped_copy(shipped_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(shipped_run, run, ignore=shutil.ignore_patterns("jetson-*"))
    return run


def overwrite_in_place(path: Path, offset: int = 4096, size: int = 4096) -> None:
    """4 KB overwritten, same size, same name: the edit a checksum of names and sizes cannot see."""
    data = bytearray(path.read_bytes())
    offset = min(offset, max(0, len(data) - size))
    data[offset:offset + size] = bytes([0x41]) * min(size, len(data) - offset)
    path.write_bytes(bytes(data))


# ---- row 1: a shipped model that does not match what was validated --------------------------------

def test_an_artifact_altered_after_validation_is_neither_bundled_nor_validated(shipped_copy, tmp_path):
    run = shipped_copy
    overwrite_in_place(run / "intel-cpu" / "model.bin")
    before = tree_digest(run)
    out = tmp_path / "bundle"
    for extra in ([], ["--allow-failed"]):
        result = cli("bundle", run, "--target", "intel-cpu", "--out", out, "--archive", *extra)
        assert result.exit_code == 4, result.output
        assert "model.bin" in result.output and "changed since compile" in result.output
    assert not out.exists() and not Path(f"{out}.tar.gz").exists()
    result = cli("validate", run, "--target", "intel-cpu")
    assert result.exit_code == 4 and "model.bin" in result.output, result.output
    assert tree_digest(run) == before


def test_a_parity_report_about_other_bytes_is_refused(shipped_copy, tmp_path):
    """Recompiling after validate is caught by time; a compile record forged to match altered bytes
    is caught by the hashes parity.json kept of the bytes it measured."""
    run = shipped_copy
    folder = run / "intel-cpu"
    overwrite_in_place(folder / "model.bin")
    record = json.loads((folder / "compiled.json").read_text())
    record["files"]["model.bin"] = sha256_file(folder / "model.bin")
    (folder / "compiled.json").write_text(json.dumps(record))
    (folder / "parity.json").touch()  # newer than the record, as after a real validate
    result = cli("bundle", run, "--target", "intel-cpu", "--out", tmp_path / "bundle", "--allow-failed")
    assert result.exit_code == 4, result.output
    assert "parity.json" in result.output and "other bytes" in result.output
    assert not (tmp_path / "bundle").exists()


def test_the_golden_set_is_gated_at_bundle_time(shipped_copy, tmp_path):
    """Every record forged to match an altered artifact: the golden outputs, computed from the
    artifact itself, still show it does not answer like the ONNX it was compiled from (exit 1)."""
    run = shipped_copy
    folder = run / "intel-cpu"
    overwrite_in_place(folder / "model.bin", offset=0, size=1 << 20)
    record = json.loads((folder / "compiled.json").read_text())
    record["files"]["model.bin"] = sha256_file(folder / "model.bin")
    (folder / "compiled.json").write_text(json.dumps(record))
    parity = json.loads((folder / "parity.json").read_text())
    parity.update(passed=True, artifact_files=record["files"])
    for pair in parity["pairs"]:
        pair.update(passed=True, failures=[])
    (folder / "parity.json").write_text(json.dumps(parity))
    result = cli("bundle", run, "--target", "intel-cpu", "--out", tmp_path / "bundle")
    assert result.exit_code == 1, result.output
    assert "golden set misses the compiler gates" in result.output
    assert not (tmp_path / "bundle").exists()


# ---- row 2: --force deletes a training run -------------------------------------------------------

@pytest.mark.parametrize("where", ["the run", "a target folder of the run", "a user folder", "a plain file",
                                   "a folder holding the run"])
def test_force_replaces_only_a_previous_bundle(shipped_copy, tmp_path, where):
    run = shipped_copy
    user = tmp_path / "notes"
    user.mkdir()
    (user / "line3.txt").write_text("calibration notes, not a bundle\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("a file\n")
    out = {"the run": run, "a target folder of the run": run / "x86-onnxruntime", "a user folder": user,
           "a plain file": plain, "a folder holding the run": tmp_path}[where]
    before = {p: tree_digest(p) if p.is_dir() else sha256_file(p) for p in (run, user, plain)}
    result = cli("bundle", run, "--target", "x86-onnxruntime", "--out", out, "--force", "--allow-failed")
    assert result.exit_code == 2, result.output
    assert "--force" in result.output and str(out.name) in result.output
    assert {p: tree_digest(p) if p.is_dir() else sha256_file(p) for p in (run, user, plain)} == before


def test_force_does_replace_a_previous_bundle(shipped_copy, tmp_path):
    run, out = shipped_copy, tmp_path / "bundle"
    assert cli("bundle", run, "--target", "x86-onnxruntime", "--out", out, "--allow-failed").exit_code == 0
    (out / "stale.txt").write_text("left in the old bundle\n")  # replaced, not merged: this must go
    result = cli("bundle", run, "--target", "x86-onnxruntime", "--out", out, "--force", "--allow-failed")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["kind"] == "edgetransfer-bundle"
    assert not (out / "stale.txt").exists()
    assert cli("verify", out, "--hashes-only", "--allow-failed").exit_code == 0  # bundled with --allow-failed


# ---- row 3: an output folder inside the dataset --------------------------------------------------

@pytest.mark.parametrize("where", ["DATA/train/run", "DATA/train/ok/run", "DATA itself", "around DATA"])
def test_train_refuses_an_output_folder_that_overlaps_the_dataset(tiny_data, tmp_path, where):
    data = tmp_path / "parent" / "data"
    shutil.copytree(tiny_data, data)
    out = {"DATA/train/run": data / "train" / "run", "DATA/train/ok/run": data / "train" / "ok" / "run",
           "DATA itself": data, "around DATA": tmp_path / "parent"}[where]
    before = tree_digest(tmp_path)
    result = cli(*cli_train_args(data, out))
    assert result.exit_code == 2, result.output
    assert "overlaps the dataset" in result.output
    assert tree_digest(tmp_path) == before


def test_train_refuses_an_output_path_that_is_a_file(tiny_data, tmp_path):
    out = tmp_path / "afile"
    out.write_text("not a run\n")
    result = cli(*cli_train_args(tiny_data, out))
    assert result.exit_code == 2 and "not a folder" in result.output, result.output
    assert out.read_text() == "not a run\n"
