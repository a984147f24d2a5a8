"""Hostile inputs that once hung the CLI or ended in a traceback (issue 12, rows 4-11): each ends with the
contract's exit code, one line and no traceback, in bounded time, with nothing left under a final name.
The bounds asserted here catch hangs (seconds, generous on a loaded 2-core machine), not speed."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from edgetransfer.cli import main

from ..conftest import cli_train_args

DEEP = 100_000


def cli(*args: object):
    start = time.perf_counter()
    result = CliRunner().invoke(main, [str(a) for a in args])
    result.seconds = time.perf_counter() - start
    assert "Traceback" not in result.output, result.output
    return result


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---- row 4: configuration files nested thousands deep ----------------------------------------------

@pytest.mark.parametrize("depth", [2_000, DEEP])
def test_deeply_nested_yaml_is_refused_at_once(tiny_data, tmp_path, depth):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {tiny_data}\nout: {tmp_path / 'run'}\ntargets: {nested(depth)}\n")
    profile = tmp_path / "target.yaml"
    profile.write_text(f"name: deep\nbackend: onnxruntime\nbatch: {nested(depth)}\n")
    for args in (["run", recipe], ["targets", "show", profile]):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert "nested more than" in result.output and result.seconds < 10
    assert not (tmp_path / "run").exists()


# ---- rows 5, 6, 8: manifests and archives ----------------------------------------------------------

def test_a_manifest_nested_too_deep_is_refused(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(nested(DEEP))
    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle / "manifest.json", arcname="manifest.json")
    for target in (bundle, archive):
        for command in ("verify", "infer"):
            args = [command, target] + ([tmp_path] if command == "infer" else [])
            result = cli(*args)
            assert result.exit_code == 4, result.output
            assert "nested too deep" in result.output


def test_a_manifest_that_is_a_fifo_does_not_hang(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    os.mkfifo(bundle / "manifest.json")
    # a child process with a timeout: a regression must fail this test, not hang the suite
    proc = subprocess.run([sys.executable, "-m", "edgetransfer", "verify", str(bundle)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "EDGETRANSFER_PROGRESS": "0"})
    assert proc.returncode == 4, proc.stderr
    assert "not a regular file" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_an_archive_member_name_too_long_is_refused(tmp_path):
    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("manifest.json", "model/" + "a" * 300 + ".onnx"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    result = cli("verify", archive)
    assert result.exit_code == 4, result.output
    assert "name too long" in result.output


# ---- rows 9, 10: numbers a run cannot use ----------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "inf"), ("--img-size", "100000"),
                                        ("--workers", "10000")])
def test_train_refuses_numbers_it_cannot_use(tiny_data, tmp_path, flag, value):
    out = tmp_path / "run"
    result = cli(*cli_train_args(tiny_data, out), flag, value)
    assert result.exit_code == 2, result.output
    assert not out.exists()


def test_a_recipe_with_a_nan_learning_rate_is_refused(tiny_data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {tiny_data}\nout: {tmp_path / 'run'}\ntrain: {{lr: .nan}}\n")
    result = cli("run", recipe)
    assert result.exit_code == 2 and "lr" in result.output, result.output
    assert not (tmp_path / "run").exists()


# ---- row 11: quantize on a model ONNX Runtime cannot run -------------------------------------------

def test_quantize_refuses_a_model_onnx_runtime_cannot_load(run_copy):
    model = onnx.load(run_copy / "model.onnx")
    node = model.graph.node[-1]
    node.domain = "com.example.custom"
    model.opset_import.add(domain="com.example.custom", version=1)
    onnx.save(model, run_copy / "model.onnx")
    result = cli("quantize", run_copy, "--target", "x86-onnxruntime")
    assert result.exit_code == 4, result.output
    assert "ONNX Runtime cannot load" in result.output
    assert not (run_copy / "x86-onnxruntime").exists()
    shutil.rmtree(run_copy)


# ---- row 12: one class, two folder names --------------------------------------------------------------

@pytest.mark.parametrize("names", [("caf\u00e9", "cafe\u0301"), ("Bolt", "bolt")], ids=["nfc-nfd", "case"])
def test_class_folders_that_name_the_same_class_are_refused(tiny_data, tmp_path, names):
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "train", data / "train")
    source = next(p for p in (data / "train").iterdir() if p.is_dir())
    for name in names:
        shutil.copytree(source, data / "train" / name)
    result = cli(*cli_train_args(data, tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert "name the same class" in result.output
    assert not (tmp_path / "run").exists()


# ---- row 18: what a killed bundle left behind ---------------------------------------------------------

def test_a_killed_bundles_temporary_folder_is_swept_by_the_next_bundle(shipped_run, tmp_path):
    from edgetransfer.fsutil import _owner

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as after kill -9
    out = tmp_path / "bundle"
    leftover = tmp_path / f".{out.name}.{_owner()}.{dead.pid}.abc123.tmp"
    (leftover / "model").mkdir(parents=True)
    (leftover / "model" / "model.onnx").write_bytes(b"\0" * 1024)
    result = cli("bundle", shipped_run, "--target", "x86-onnxruntime", "--out", out, "--allow-failed", "--archive")
    assert result.exit_code == 0, result.output
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "bundle.tar.gz"]


# ---- row 22: small inconsistencies --------------------------------------------------------------------

def test_a_misspelled_backbone_gets_a_did_you_mean(tiny_data, tmp_path):
    result = cli(*cli_train_args(tiny_data, tmp_path / "run", backbone="resnet1"))
    assert result.exit_code == 2 and "did you mean 'resnet18'" in result.output, result.output


def test_bundle_and_verify_count_the_same_files(shipped_run, tmp_path):
    out = tmp_path / "bundle"
    made = cli("bundle", shipped_run, "--target", "x86-onnxruntime", "--out", out, "--allow-failed")
    checked = cli("verify", out, "--hashes-only", "--allow-failed")  # bundled with --allow-failed
    assert made.exit_code == 0 and checked.exit_code == 0, made.output + checked.output
    files = len(json.loads((out / "manifest.json").read_text())["files"])
    assert f"{files} hashed + manifest.json" in made.output and f"{files} hashed + manifest.json" in checked.output


# ---- row 14: a run that failed before its first epoch ---------------------------------------------------

def test_a_run_that_never_finished_an_epoch_starts_again_in_place(tiny_data, tmp_path, monkeypatch):
    """Fault injection: the first epoch dies (as with a MemoryError or an image deleted mid-epoch)."""
    from edgetransfer.adapt import train as training

    out = tmp_path / "run"

    def dies(self, *args, **kwargs):
        raise MemoryError("injected before the first epoch ended")

    with monkeypatch.context() as patch:
        patch.setattr(training.Trainer, "fit", dies)
        result = cli(*cli_train_args(tiny_data, out))
    assert result.exit_code != 0 and out.exists() and not (out / "checkpoints").exists()
    resumed = cli(*cli_train_args(tiny_data, out), "--resume")
    assert resumed.exit_code == 2 and "without --resume" in resumed.output, resumed.output
    again = cli(*cli_train_args(tiny_data, out))
    assert again.exit_code == 0, again.output
    assert (out / "model.safetensors").exists() and (out / "meta.json").exists()


# ---- row 19: errors about an archive name the archive ---------------------------------------------------

def test_errors_inside_an_archive_name_the_archive_not_a_temporary_folder(bundles, tmp_path):
    archive = tmp_path / "line3.tar.gz"
    with tarfile.open(bundles["x86-onnxruntime.tar.gz"], "r:gz") as src, tarfile.open(archive, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith("expected.npy"):
                data = data[:-8] + b"\x00" * 8  # one golden value changed: its sha256 no longer matches
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    result = cli("verify", archive, "--allow-failed")
    assert result.exit_code == 4, result.output
    assert f"{archive}:golden/expected.npy" in result.output
    assert "edgetransfer-bundle-" not in result.output


# ---- row 13: a recipe with several mistakes ---------------------------------------------------------------

def test_a_recipe_reports_every_problem_at_once_with_its_own_field_names(tiny_data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {tiny_data}\nout: {tmp_path / 'run'}\n"
                      "train: {epochs: \"ten\", lr: 1e-4, learnign_rate: 3, img_size: 7, batch_size: 0}\n")
    result = cli("run", recipe)
    assert result.exit_code == 2, result.output
    out = result.output
    assert str(recipe) in out
    for line in ("train.learnign_rate: unknown key (did you mean 'lr'?)", "train.epochs: expected an integer",
                 "train.img_size: must be at least 8, got 7", "train.batch_size: must be at least 1, got 0"):
        assert line in out, out
    assert "lr" not in out.replace("learnign_rate", "").replace("'lr'", ""), "1e-4 is the number the user meant"
    assert not (tmp_path / "run").exists()


def test_a_recipe_reads_1e_minus_4_as_a_number(tiny_data, tmp_path):
    from edgetransfer.pipeline import Recipe
    from edgetransfer.schema import from_dict, read_yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {tiny_data}\nout: {tmp_path / 'run'}\ntrain: {{lr: 1e-4, backbone: resnet18}}\n")
    assert read_yaml(recipe)["train"]["lr"] == "1e-4"  # what YAML 1.1 gives
    assert from_dict(Recipe, read_yaml(recipe), source=recipe).train.lr == pytest.approx(1e-4)


# ---- row 17: links in folders ------------------------------------------------------------------------------

def test_infer_reads_linked_images_and_names_a_broken_link_it_skips(bundles, tiny_data, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    image = next((tiny_data / "test").rglob("*.png"))
    (folder / "linked.png").symlink_to(image)  # outside this folder: read where it points
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")  # broken
    result = CliRunner().invoke(main, ["infer", str(bundles["x86-onnxruntime"]), str(folder)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["source"]).name for r in records] == ["linked.png"]
    assert "skipped 1 image name" in result.stderr and "gone.png" in result.stderr


# ---- row 15: a manifest far larger than any edgetransfer writes -------------------------------------------

def test_an_oversized_manifest_is_refused_before_it_is_read(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with open(bundle / "manifest.json", "wb") as fh:  # sparse: 64 MiB claimed, nothing to parse
        fh.truncate(64 << 20)
    result = cli("verify", bundle)
    assert result.exit_code == 4, result.output
    assert "a manifest is at most" in result.output and result.seconds < 10


# ---- row 16: an archive that holds more than its manifest declares ----------------------------------------

@pytest.mark.parametrize("extra", ["unlisted", "larger"])
def test_an_archive_holding_more_than_its_manifest_declares_is_refused_before_extraction(bundles, tmp_path, extra,
                                                                                        monkeypatch):
    source = bundles["x86-onnxruntime.tar.gz"]
    archive = tmp_path / "grown.tar.gz"
    big = bytes(64 << 20)  # 64 MiB of zeros: well under 1 MB compressed
    with tarfile.open(source, "r:gz") as src, tarfile.open(archive, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if extra == "larger" and member.name.endswith("inputs.npy"):
                data = big
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
        if extra == "unlisted":
            info = tarfile.TarInfo("model/padding.bin")
            info.size = len(big)
            dst.addfile(info, io.BytesIO(big))
    assert archive.stat().st_size < source.stat().st_size + (1 << 20)  # the 64 MiB compress to ~64 KiB
    # a temporary folder of this test's own (the shared /tmp changes under other jobs), and the archive's
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("verify", archive, "--allow-failed")
    assert result.exit_code == 4, result.output
    assert ("is not listed in the bundle's manifest.json" if extra == "unlisted" else "the manifest declares") \
        in result.output
    assert not list(private.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind
