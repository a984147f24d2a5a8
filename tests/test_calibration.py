"""Calibration-set selection on the shared tiny dataset: train/val only (never test, also when test is
split off the same folders), balanced over classes, seeded, and recorded file by file with sha256."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections import Counter
from pathlib import Path

import pytest

from edgetransfer.data.calibration import select_calibration
from edgetransfer.data.folder import DatasetSplits, scan_dataset
from edgetransfer.errors import UsageError
from edgetransfer.targets import CalibrationPreset, load_calibration


@pytest.fixture(scope="module")
def splits(tiny_data) -> DatasetSplits:
    """train/, val/ and test/ folders on disk."""
    return scan_dataset(tiny_data, verify=False)


@pytest.fixture(scope="module")
def flat_splits(tiny_data, tmp_path_factory) -> DatasetSplits:
    """All images in DATA/<class>/ with no split folders: val and test are split off the same folders."""
    root = tmp_path_factory.mktemp("flat") / "data"
    for image in sorted(tiny_data.rglob("*.png")):
        dst = root / image.parent.name / f"{image.parent.parent.name}-{image.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, dst)
    s = scan_dataset(root, verify=False)
    assert s.record["sources"]["test"] == "generated" and s.test
    return s


def _preset(**kw) -> CalibrationPreset:
    return CalibrationPreset(**{"name": "t", "samples": 100, "min_per_class": 1, **kw})


def _paths(samples) -> set[Path]:
    return {s.path.resolve() for s in samples}


@pytest.mark.parametrize("layout", ["split_folders", "class_folders"])
@pytest.mark.parametrize("use", [("train",), ("val",), ("train", "val")])
def test_never_selects_test_images(layout, use, splits, flat_splits):
    s = splits if layout == "split_folders" else flat_splits
    chosen = select_calibration(s, _preset(splits=use))
    picked = _paths(chosen.samples)
    allowed = set().union(*(_paths(s.split(name)) for name in use))
    assert picked, "nothing selected"
    assert not picked & _paths(s.test)
    assert picked == allowed  # 100 asked, fewer available: everything allowed is used, nothing else
    recorded = {(Path(s.root) / f["path"]).resolve() for f in chosen.record["files"]}
    assert recorded == picked


def test_a_test_image_listed_in_train_too_is_still_excluded(splits):
    leaked = dataclasses.replace(splits, train=splits.train + splits.test[:3])
    picked = _paths(select_calibration(leaked, _preset()).samples)
    assert not picked & _paths(splits.test)
    assert len(picked) == len(splits.train) + len(splits.val)


def test_a_preset_that_names_the_test_split_is_refused(splits):
    bad = CalibrationPreset(name="bad", splits=("train", "test"))  # built by hand, past the schema
    with pytest.raises(UsageError) as info:
        select_calibration(splits, bad)
    assert info.value.exit_code == 2 and "test" in str(info.value)


@pytest.mark.parametrize("samples", [5, 7, 13, 24, 30])
def test_selection_is_stratified_over_classes(splits, samples):
    chosen = select_calibration(splits, _preset(samples=samples))
    counts = Counter(splits.classes[s.label] for s in chosen.samples)
    assert sum(counts.values()) == samples
    per_class = [counts.get(c, 0) for c in splits.classes]
    assert max(per_class) - min(per_class) <= 1, per_class
    assert chosen.record["per_class"] == dict(zip(splits.classes, per_class))
    assert not chosen.warnings


def test_selection_is_deterministic_for_a_seed_and_differs_for_another(splits):
    def pick(seed: int) -> list[str]:
        return [f["path"] for f in select_calibration(splits, _preset(samples=10, seed=seed)).record["files"]]

    assert pick(0) == pick(0)
    assert pick(0) != pick(1)
    assert sorted(pick(1)) != sorted(pick(0))  # another subset, not just another order


def test_the_record_lists_every_file_with_its_sha256(splits):
    chosen = select_calibration(splits, load_calibration("quick"))
    record = chosen.record
    assert record["preset"] == "quick" and record["method"] == "minmax" and record["seed"] == 0
    assert record["count"] == len(record["files"]) == len(chosen.samples)
    assert sum(record["per_class"].values()) == record["count"]
    for entry, sample in zip(record["files"], chosen.samples):
        path = Path(splits.root) / entry["path"]
        assert not Path(entry["path"]).is_absolute()
        assert path.resolve() == sample.path.resolve()
        assert entry["class"] == splits.classes[sample.label] == path.parent.name
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_asking_for_more_than_available_warns_with_the_shortfall(splits):
    available = len(splits.train) + len(splits.val)
    chosen = select_calibration(splits, _preset(name="big", samples=available + 70))
    assert len(chosen.samples) == available
    assert chosen.record["requested"] == available + 70 and chosen.record["count"] == available
    [warning] = [w for w in chosen.warnings if w.startswith("only")]
    assert f"only {available} calibration images" in warning and f"asks for {available + 70}" in warning
    assert "'big'" in warning
    assert chosen.record["warnings"] == chosen.warnings


def test_a_class_without_train_or_val_images_is_named(splits):
    gone = splits.classes[1]
    keep = [s for s in splits.train if s.label != 1], [s for s in splits.val if s.label != 1]
    holed = dataclasses.replace(splits, train=keep[0], val=keep[1])  # the class still has test images
    chosen = select_calibration(holed, _preset(samples=20))
    assert chosen.record["per_class"][gone] == 0
    assert f"classes missing from the calibration set: {gone}" in chosen.warnings
    assert len(chosen.samples) == 20  # the others make up the number
    counts = Counter(s.label for s in chosen.samples)
    assert set(counts) == set(range(len(splits.classes))) - {1}


def test_classes_under_min_per_class_are_named(splits):
    thin = splits.classes[3]
    train = [s for s in splits.train if s.label != 3] + [s for s in splits.train if s.label == 3][:1]
    val = [s for s in splits.val if s.label != 3]
    chosen = select_calibration(dataclasses.replace(splits, train=train, val=val),
                                _preset(samples=25, min_per_class=4))
    assert chosen.record["per_class"][thin] == 1
    [warning] = [w for w in chosen.warnings if "fewer than 4" in w]
    assert warning.endswith(f": {thin} (1)"), warning  # named with its count, and no other class
