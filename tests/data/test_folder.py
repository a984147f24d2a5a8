"""ImageFolder scanning: layouts, strict checks, stratified splits, verification and the data hash.

Every test builds a real tree of small image files with Pillow in tmp_path; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetransfer.data.folder import (
    IMAGE_EXTENSIONS,
    DatasetSplits,
    Sample,
    dataset_hash,
    scan_dataset,
    scan_split,
    verify_images,
)
from edgetransfer.errors import DataError, UsageError


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (12, 10), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def make_tree(root: Path, layout: dict[str, dict[str, int]], ext: str = ".png") -> Path:
    """layout: {"train": {"ok": 5, "scratch": 4}, "val": {...}}; "" as split key = class folders at root."""
    seed = 0
    for split, classes in layout.items():
        for cls, n in classes.items():
            for i in range(n):
                seed += 1
                write_image(root / split / cls / f"img_{i:03d}{ext}", seed)
    return root


def data_error(excinfo: pytest.ExceptionInfo) -> str:
    exc = excinfo.value
    assert isinstance(exc, DataError)
    assert exc.exit_code == 2
    return str(exc)


def paths(samples: list[Sample]) -> set[Path]:
    return {s.path for s in samples}


# ---- layouts -------------------------------------------------------------------------------------

def test_extensions_constant():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
    assert isinstance(IMAGE_EXTENSIONS, frozenset)


def test_full_layout_from_disk(tmp_path):
    root = make_tree(tmp_path / "d", {"train": {"scratch": 3, "ok": 4}, "val": {"ok": 2, "scratch": 1},
                                      "test": {"ok": 1, "scratch": 2}})
    ds = scan_dataset(root)
    assert isinstance(ds, DatasetSplits)
    assert ds.classes == ["ok", "scratch"]
    assert ds.counts() == {"train": {"ok": 4, "scratch": 3}, "val": {"ok": 2, "scratch": 1},
                           "test": {"ok": 1, "scratch": 2}}
    assert ds.record["sources"] == {"train": "disk", "val": "disk", "test": "disk"}
    assert ds.record["generated"] == {}
    for split in ("train", "val", "test"):
        for s in ds.split(split):
            assert s.path.parent.name == ds.classes[s.label]
            assert s.path.is_file()
    assert ds.train == sorted(ds.train, key=lambda s: (s.label, s.path))
    json.dumps(ds.record)  # JSON-able


def test_only_train_generates_val_and_test(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 20, "b": 10, "c": 7}})
    ds = scan_dataset(root, val_fraction=0.15, test_fraction=0.15, seed=3)
    assert ds.record["sources"] == {"train": "disk", "val": "generated", "test": "generated"}
    counts = ds.counts()
    assert counts["val"] == {"a": 3, "b": 2, "c": 1}  # round-half-up(20*.15)=3, (10*.15)=1.5 -> 2, 7*.15 -> 1
    assert counts["test"] == {"a": 3, "b": 2, "c": 1}
    assert counts["train"] == {"a": 14, "b": 6, "c": 5}
    rec = json.loads(json.dumps(ds.record))
    assert rec["seed"] == 3 and rec["fractions"] == {"val": 0.15, "test": 0.15}
    assert rec["counts"] == counts
    for split in ("val", "test"):
        assert rec["generated"][split] == [s.path.relative_to(root).as_posix() for s in ds.split(split)]
        assert all(p.startswith("train/") for p in rec["generated"][split])


def test_train_and_val_on_disk_test_generated(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 10, "b": 10}, "val": {"a": 2, "b": 2}})
    ds = scan_dataset(root, test_fraction=0.2)
    assert ds.record["sources"] == {"train": "disk", "val": "disk", "test": "generated"}
    assert all("/val/" in s.path.as_posix() for s in ds.val)
    assert ds.counts()["test"] == {"a": 2, "b": 2}
    assert not paths(ds.train) & paths(ds.test)
    assert set(ds.record["generated"]) == {"test"}


def test_class_folders_at_root_layout(tmp_path):
    root = make_tree(tmp_path, {"": {"good": 10, "bad": 10}})
    ds = scan_dataset(root)
    assert ds.classes == ["bad", "good"]
    assert ds.record["layout"] == "class_folders"
    assert ds.record["sources"]["val"] == ds.record["sources"]["test"] == "generated"
    assert len(ds.train) + len(ds.val) + len(ds.test) == 20
    assert all(not p.startswith("train/") for p in ds.record["generated"]["val"])


def test_zero_fraction_leaves_split_empty(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 2, "b": 2}})
    ds = scan_dataset(root, val_fraction=0.25, test_fraction=0.0)
    assert ds.test == [] and ds.counts()["test"] == {"a": 0, "b": 0}
    assert ds.counts()["val"] == {"a": 1, "b": 1}


def test_hidden_and_non_image_entries_are_ignored(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 3, "b": 3}})
    write_image(root / "train" / ".ipynb_checkpoints" / "x.png")
    write_image(root / "train" / "__MACOSX" / "a" / "y.png")
    (root / "train" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "train" / "a" / "._img_000.png").write_bytes(b"AppleDouble junk")  # not an image: must be skipped
    write_image(root / "train" / "a" / ".hidden" / "z.png")
    write_image(root / "train" / "a" / "__MACOSX" / "w.png")
    (root / "train" / "a" / "notes.txt").write_text("hello")
    (root / "train" / "b" / "labels.csv").write_text("x,y")
    ds = scan_dataset(root)
    assert ds.classes == ["a", "b"]
    assert len(ds.train) + len(ds.val) + len(ds.test) == 6
    assert all(s.path.suffix == ".png" and not s.path.name.startswith(".") for s in ds.train + ds.val + ds.test)


def test_recursive_and_case_insensitive_extensions(tmp_path):
    root = tmp_path / "d"
    write_image(root / "train" / "a" / "z.PNG")
    write_image(root / "train" / "a" / "sub" / "b.JpG", fmt="JPEG")
    write_image(root / "train" / "a" / "sub" / "deeper" / "c.jpeg")
    write_image(root / "train" / "a" / "a.Tiff", fmt="TIFF")
    write_image(root / "train" / "b" / "x.bmp")
    ds = scan_dataset(root, val_fraction=0, test_fraction=0)
    rel = [s.path.relative_to(root / "train").as_posix() for s in ds.train]
    assert rel == ["a/a.Tiff", "a/sub/b.JpG", "a/sub/deeper/c.jpeg", "a/z.PNG", "b/x.bmp"]


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_symlinked_directory_loop_is_not_followed(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 3, "b": 3}})
    os.symlink(root / "train" / "a", root / "train" / "a" / "loop", target_is_directory=True)
    os.symlink(root / "train", root / "train" / "b" / "up", target_is_directory=True)
    ds = scan_dataset(root, val_fraction=0, test_fraction=0)
    assert ds.counts()["train"] == {"a": 3, "b": 3}


# ---- class matching ------------------------------------------------------------------------------

def test_classes_matched_by_name_not_position(tmp_path):
    # val lacks "a": by position, val/b would get label 0 and val/c label 1 -- by name they are 1 and 2.
    root = make_tree(tmp_path, {"train": {"a": 3, "b": 3, "c": 3}, "val": {"c": 2, "b": 1},
                                "test": {"c": 1}})
    ds = scan_dataset(root, test_fraction=0.2)
    assert ds.classes == ["a", "b", "c"]
    assert {(s.path.parent.name, s.label) for s in ds.val} == {("b", 1), ("c", 2)}
    assert [s.label for s in ds.test] == [2]
    assert ds.counts()["val"] == {"a": 0, "b": 1, "c": 2}


def test_given_class_order_is_kept_in_every_split(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 3, "b": 3, "c": 3}, "val": {"a": 1, "c": 1},
                                "test": {"b": 1}})
    ds = scan_dataset(root, classes=["c", "a", "b"])
    assert ds.classes == ["c", "a", "b"]
    for split in ("train", "val", "test"):
        for s in ds.split(split):
            assert ds.classes[s.label] == s.path.parent.name
    assert [s.label for s in ds.train][:3] == [0, 0, 0]  # class "c" first


def test_given_classes_must_match_train_exactly(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 3, "b": 3, "extra": 3}})
    with pytest.raises(DataError) as ei:
        scan_dataset(root, classes=["a", "b", "gone"])
    msg = data_error(ei)
    assert "gone" in msg and "extra" in msg and str(root / "train") in msg


def test_unknown_class_in_val_is_named_with_split(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 3, "b": 3}, "val": {"a": 1, "rust": 1, "Dent": 1}})
    with pytest.raises(DataError) as ei:
        scan_dataset(root)
    msg = data_error(ei)
    assert "rust" in msg and "Dent" in msg and "val" in msg and str(root / "val") in msg


def test_unknown_class_hint_for_case_mismatch(tmp_path):
    root = make_tree(tmp_path, {"train": {"scratch": 3}, "test": {"Scratch": 1}})
    with pytest.raises(DataError) as ei:
        scan_dataset(root)
    assert "case-sensitive" in data_error(ei)


# ---- errors --------------------------------------------------------------------------------------

def test_missing_root(tmp_path):
    with pytest.raises(DataError) as ei:
        scan_dataset(tmp_path / "nope")
    msg = data_error(ei)
    assert str(tmp_path / "nope") in msg and "DATA/train/<class>" in msg


def test_root_is_a_file(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    with pytest.raises(DataError) as ei:
        scan_dataset(f)
    assert "not a folder" in data_error(ei)


def test_val_without_train_names_expected_layout(tmp_path):
    root = make_tree(tmp_path, {"val": {"a": 2}, "test": {"a": 2}})
    with pytest.raises(DataError) as ei:
        scan_dataset(root)
    msg = data_error(ei)
    assert "no train/" in msg and "DATA/train/<class>" in msg and str(root) in msg


def test_no_classes(tmp_path):
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "train" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as ei:
        scan_dataset(tmp_path)
    msg = data_error(ei)
    assert "no class folders" in msg and str(tmp_path / "train") in msg


def test_empty_root(tmp_path):
    with pytest.raises(DataError) as ei:
        scan_dataset(tmp_path)
    assert "no class folders" in data_error(ei)


def test_class_folder_without_images_is_named(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 3}})
    (root / "train" / "empty_cls").mkdir()
    (root / "train" / "empty_cls" / "notes.txt").write_text("only text")
    write_image(root / "train" / "empty_cls" / ".hidden.png")
    with pytest.raises(DataError) as ei:
        scan_dataset(root)
    msg = data_error(ei)
    assert "empty_cls" in msg and "no images" in msg and str(root / "train" / "empty_cls") in msg


def test_class_too_small_to_split(tmp_path):
    root = make_tree(tmp_path, {"train": {"big": 10, "tiny": 2}})
    with pytest.raises(DataError) as ei:
        scan_dataset(root)
    msg = data_error(ei)
    assert "'tiny' has 2 image(s)" in msg and str(root / "train" / "tiny") in msg
    # a single generated split needs only 2 images per class
    ds = scan_dataset(root, val_fraction=0.2, test_fraction=0.0)
    assert ds.counts()["val"]["tiny"] == 1 and ds.counts()["train"]["tiny"] == 1


def test_three_images_split_one_each(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 3, "b": 4}})
    ds = scan_dataset(root, val_fraction=0.05, test_fraction=0.05)
    assert ds.counts() == {"train": {"a": 1, "b": 2}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}}
    ds = scan_dataset(root, val_fraction=0.45, test_fraction=0.45)  # rounding would empty train: keep 1
    assert ds.counts()["train"] == {"a": 1, "b": 1}


@pytest.mark.parametrize("kw", [{"val_fraction": 1.0}, {"test_fraction": -0.1}, {"val_fraction": 0.5, "test_fraction": 0.5},
                                {"seed": -1}, {"seed": 1.5}])
def test_bad_arguments_are_usage_errors(tmp_path, kw):
    root = make_tree(tmp_path, {"train": {"a": 5}})
    with pytest.raises(UsageError) as ei:
        scan_dataset(root, **kw)
    assert ei.value.exit_code == 2


def test_split_accessor(tmp_path):
    ds = scan_dataset(make_tree(tmp_path, {"train": {"a": 5}}))
    assert ds.split("train") is ds.train and ds.split("test") is ds.test
    with pytest.raises(UsageError) as ei:
        ds.split("validation")
    assert ei.value.exit_code == 2 and "validation" in str(ei.value)


# ---- stratification ------------------------------------------------------------------------------

def test_stratified_split_properties(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 30, "b": 9, "c": 3, "d": 17}})
    all_files = {p for p in (root / "train").rglob("*.png")}
    ds = scan_dataset(root, seed=7, verify=False)
    for split in ("train", "val", "test"):
        assert all(v >= 1 for v in ds.counts()[split].values()), split
    tr, va, te = paths(ds.train), paths(ds.val), paths(ds.test)
    assert not tr & va and not tr & te and not va & te
    assert tr | va | te == all_files
    assert len(ds.train) + len(ds.val) + len(ds.test) == len(all_files)  # no duplicates
    # labels still follow the folder name after the shuffle
    assert all(ds.classes[s.label] == s.path.parent.name for s in ds.train + ds.val + ds.test)

    again = scan_dataset(root, seed=7, verify=False)
    assert (again.train, again.val, again.test) == (ds.train, ds.val, ds.test)
    assert again.record == ds.record
    other = scan_dataset(root, seed=8, verify=False)
    assert paths(other.val) != va or paths(other.test) != te
    assert other.counts() == ds.counts()  # the seed changes which files, never how many


def test_split_of_one_class_ignores_other_classes(tmp_path):
    # Adding a class must not reshuffle the existing ones (seed is per class name).
    root = make_tree(tmp_path, {"train": {"a": 12, "b": 12}})
    before = scan_dataset(root, verify=False)
    make_tree(tmp_path / "more", {"train": {"0new": 5}})
    shutil.move(str(tmp_path / "more" / "train" / "0new"), str(root / "train" / "0new"))
    after = scan_dataset(root, verify=False)
    for split in ("val", "test"):
        old = {s.path for s in before.split(split)}
        new = {s.path for s in after.split(split) if s.path.parent.name != "0new"}
        assert old == new


# ---- scan_split ----------------------------------------------------------------------------------

def test_scan_split_labels_by_name_and_allows_missing_classes(tmp_path):
    folder = make_tree(tmp_path, {"eval": {"scratch": 2, "dent": 1}}) / "eval"
    samples = scan_split(folder, ["ok", "dent", "scratch"])
    assert [(s.path.parent.name, s.label) for s in samples] == [("dent", 1), ("scratch", 2), ("scratch", 2)]


def test_scan_split_unknown_class(tmp_path):
    folder = make_tree(tmp_path, {"eval": {"ok": 1, "mystery": 1}}) / "eval"
    with pytest.raises(DataError) as ei:
        scan_split(folder, ["ok"])
    msg = data_error(ei)
    assert "mystery" in msg and str(folder) in msg


def test_scan_split_missing_folder(tmp_path):
    with pytest.raises(DataError) as ei:
        scan_split(tmp_path / "absent", ["ok"])
    assert str(tmp_path / "absent") in data_error(ei)


# ---- verification --------------------------------------------------------------------------------

def test_truncated_and_empty_files_listed_together(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 4, "b": 4}})
    jpg = write_image(root / "train" / "a" / "broken.jpg", seed=99, size=(64, 64), fmt="JPEG")
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    empty = root / "train" / "b" / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as ei:
        scan_dataset(root)
    msg = data_error(ei)
    assert str(jpg) in msg and str(empty) in msg
    assert "2 unreadable" in msg and "0 bytes" in msg and "truncated" in msg
    # the scan itself succeeds without verification, and verify_images alone raises the same listing
    ds = scan_dataset(root, verify=False)
    with pytest.raises(DataError) as ei2:
        verify_images(ds.train + ds.val + ds.test)
    assert str(jpg) in str(ei2.value) and str(empty) in str(ei2.value)


def test_verify_single_bad_file_names_it(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png at all")
    good = write_image(tmp_path / "y.png")
    with pytest.raises(DataError) as ei:
        verify_images([Sample(good, 0), Sample(bad, 0)])
    assert ei.value.path == bad and str(bad) in data_error(ei) and str(good) not in str(ei.value)
    verify_images([Sample(good, 0)])  # no error
    verify_images([])


# ---- dataset hash --------------------------------------------------------------------------------

def test_dataset_hash_stable_and_location_independent(tmp_path):
    root = make_tree(tmp_path / "one", {"train": {"a": 6, "b": 6}, "test": {"a": 1, "b": 1}})
    h = dataset_hash(scan_dataset(root))
    assert len(h) == 64 and int(h, 16) >= 0
    assert dataset_hash(scan_dataset(root)) == h
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, copy)
    assert dataset_hash(scan_dataset(copy)) == h
    assert dataset_hash(scan_dataset(root, seed=1)) != h  # a different split is different data for training


def test_dataset_hash_sensitive_to_one_byte(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 5, "b": 5}})
    ds = scan_dataset(root)
    h = dataset_hash(ds)
    target = ds.train[0].path
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    assert dataset_hash(ds) != h


def test_dataset_hash_sensitive_to_rename(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 5, "b": 5}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    h = dataset_hash(scan_dataset(root))
    (root / "val" / "a" / "img_000.png").rename(root / "val" / "a" / "renamed.png")
    assert dataset_hash(scan_dataset(root)) != h


def test_dataset_hash_sensitive_to_class_order(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 3, "b": 3}})
    assert dataset_hash(scan_dataset(root)) != dataset_hash(scan_dataset(root, classes=["b", "a"]))
