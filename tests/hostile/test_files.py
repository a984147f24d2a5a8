"""Hostile dataset images and model files: decompression bombs, truncated and mislabelled images
(skipped only within a bounded fraction, and listed), garbage or empty ONNX files, ONNX external data
that points outside its folder. Real files built here; exit codes, messages and disk state checked."""

from __future__ import annotations

import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edgetransfer.cli import main
from edgetransfer.data.folder import require_trainable, scan_dataset
from edgetransfer.errors import DataError, IntegrityError
from edgetransfer.onnxfile import check_onnx_file
from edgetransfer.preprocess import MAX_PIXELS, load_image

RUN_FILES = ("meta.json", "model.safetensors", "model.onnx", "train_config.json", "split.json")


def _png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming width x height pixels, with a tiny (deflated zeros) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (width + 1) * 16, 9)  # only the first rows: decoding would need all
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [10_000, 40_000])  # 100 MP: Pillow only warns; 1.6 GP: Pillow refuses too
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, side):
    bomb = _png_bomb(tmp_path / "bomb.png", side, side)
    assert bomb.stat().st_size < 100_000 and side * side > MAX_PIXELS
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_image(bomb)
    assert time.perf_counter() - start < 1.0  # refused from the header, nothing decoded
    assert "decompression bomb" in str(info.value) and str(bomb) in str(info.value)


def _tree(root: Path, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("good", "bad"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "train" / cls / f"{i}.png")
    return root


def test_bad_images_are_listed_together_or_skipped_within_the_bound(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "train/good/0.png").write_bytes((root / "train/good/0.png").read_bytes()[:40])   # truncated
    (root / "train/bad/1.png").write_bytes(b"")                                                # zero bytes
    (root / "train/bad/2.png").write_bytes(b"GIF89a not really")                               # wrong content
    with pytest.raises(DataError) as info:
        scan_dataset(root, val_fraction=0.2, test_fraction=0.2)
    text = str(info.value)
    assert info.value.exit_code == 2 and "3 unreadable image file(s) of 10" in text and "--skip-bad-images" in text
    assert all(name in text for name in ("good/0.png", "bad/1.png", "bad/2.png"))

    with pytest.raises(DataError, match="more than the 20% --skip-bad-images allows"):
        scan_dataset(root, val_fraction=0.2, test_fraction=0.2, skip_bad=0.2)
    splits = scan_dataset(root, val_fraction=0.2, test_fraction=0.2, skip_bad=0.3)
    kept = {s.path.name for split in ("train", "val", "test") for s in splits.split(split) if s.path.parent.name == "bad"}
    assert kept == {"0.png", "3.png", "4.png"}
    assert sorted(r["path"] for r in splits.record["skipped"]) == ["train/bad/1.png", "train/bad/2.png", "train/good/0.png"]
    again = scan_dataset(root, val_fraction=0.2, test_fraction=0.2, verify=False,
                         exclude=[r["path"] for r in splits.record["skipped"]])
    assert [s.path for s in again.train] == [s.path for s in splits.train]  # the survivors keep their splits


def test_a_single_class_or_a_tiny_dataset_is_a_clear_error_or_a_logged_adjustment(tmp_path, caplog):
    caplog.set_level("WARNING", logger="edgetransfer")
    root = _tree(tmp_path / "data", per_class=3)
    splits = scan_dataset(root, val_fraction=0.2, test_fraction=0.2)
    assert require_trainable(splits, 32) == len(splits.train)  # batch shrinks to the training set
    assert "larger than the" in caplog.text
    shutil.rmtree(root / "train" / "bad")
    with pytest.raises(DataError, match="only one class"):
        require_trainable(scan_dataset(root, val_fraction=0.2, test_fraction=0.2), 8)


@pytest.fixture
def run_folder(exported_run, tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in RUN_FILES:
        shutil.copy2(exported_run / name, run / name)
    return run


@pytest.mark.parametrize("content", [b"", b"\x0a\xff\xff\xff\xff\x0fgarbage" * 20, b"PK\x03\x04 a zip, not a model"])
def test_garbage_or_empty_model_files_are_exit_4(run_folder, content):
    (run_folder / "model.onnx").write_bytes(content)
    result = CliRunner().invoke(main, ["validate", str(run_folder)])
    assert result.exit_code == 4, result.output
    assert str(run_folder / "model.onnx") in result.output.replace("\n", "") and "Traceback" not in result.output
    assert not (run_folder / "parity.json").exists()
    log = (run_folder / "edgetransfer.log").read_text()
    assert "Traceback" in log and "IntegrityError" in log  # the details went to the run's log


def _external_model(folder: Path, location: str) -> Path:
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], initializer=[weight])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("location, message", [
    ("../secret.bin", "leaves the model's folder"),
    ("/etc/passwd", "leaves the model's folder"),
    ("link.bin", "goes through a link"),
    ("sub/../../secret.bin", "leaves the model's folder"),
    ("missing.bin", "is missing"),
])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location, message):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    os.symlink(tmp_path / "secret.bin", folder / "link.bin")
    path = _external_model(folder, location)
    with pytest.raises(IntegrityError) as info:
        check_onnx_file(path)
    assert info.value.exit_code == 4 and message in str(info.value) and location in str(info.value)


def test_external_data_inside_the_folder_is_accepted(tmp_path):
    folder = tmp_path / "model"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "w.bin").write_bytes(np.ones(4, np.float32).tobytes())
    check_onnx_file(_external_model(folder, "data/w.bin"))
