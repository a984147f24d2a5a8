"""Tests for the procedural factory-surface generator (edgetransfer.data.synthetic).

They check the properties the demo and the transfer-learning story rely on: byte-identical output per
seed, the ImageFolder layout, real texture on every family, defects that are local and visible, ok
images that are pure texture, and labels that global colour statistics cannot give away.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetransfer.data import synthetic as syn
from edgetransfer.data.synthetic import (
    DEFECT_CLASSES,
    FAMILIES,
    MARK_CLASSES,
    SOURCE_FAMILIES,
    TARGET_FAMILIES,
    SyntheticConfig,
    generate_dataset,
    render_sample,
    render_surface,
)
from edgetransfer.errors import UsageError

SIZE = 64


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _detail(img: np.ndarray) -> float:
    """Std of mid-frequency structure: 2x2 average (drops sensor noise) minus a 5x5 box blur (drops
    lighting gradients). A flat colour under any lamp and noise scores about 0.007 or less."""
    g = img.mean(-1)
    h = g.shape[0] // 2
    g = g[: 2 * h, : 2 * h].reshape(h, 2, h, 2).mean((1, 3))
    p = np.pad(g, 2, mode="edge")
    blur = sum(p[i:i + h, j:j + h] for i in range(5) for j in range(5)) / 25
    return float((g - blur)[4:-4, 4:-4].std())


# ------------------------------------------------------------------------------------- constants
def test_public_names_are_consistent():
    assert DEFECT_CLASSES == ("ok", "scratch", "hole", "stain", "crack")
    assert len(FAMILIES) >= 8 and len(set(FAMILIES)) == len(FAMILIES)
    assert len(MARK_CLASSES) >= 6 and not set(MARK_CLASSES) & set(DEFECT_CLASSES)
    assert set(SOURCE_FAMILIES).isdisjoint(TARGET_FAMILIES)
    assert set(SOURCE_FAMILIES) | set(TARGET_FAMILIES) <= set(FAMILIES)
    assert SyntheticConfig().counts == {"train": 40, "val": 10, "test": 20}
    assert SyntheticConfig().size == 96 and SyntheticConfig().task == "defects"


# -------------------------------------------------------------------------------------- textures
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_real_varied_texture(family):
    imgs = [render_surface(family, SIZE, _rng(k)) for k in range(6)]
    for img in imgs:
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert _detail(img) > 0.011, "texture is nearly flat"
    assert np.median([_detail(i) for i in imgs]) > 0.015
    pairs = [np.abs(imgs[i] - imgs[i + 1]).mean() for i in range(len(imgs) - 1)]
    assert min(pairs) > 0.02, "two images of the same family are nearly the same"
    again = render_surface(family, SIZE, _rng(0))
    assert np.array_equal(again, imgs[0])


def test_detail_metric_rejects_flat_colour():
    rng = _rng(0)
    flat = 0.5 + np.linspace(-0.2, 0.2, SIZE)[None, :, None] + rng.normal(0, 0.025, (SIZE, SIZE, 3))
    assert _detail(np.clip(flat, 0, 1)) < 0.009


@pytest.mark.parametrize("family", TARGET_FAMILIES[:2])
def test_ok_sample_is_the_bare_surface(family):
    for k in range(3):
        ok = render_sample("defects", "ok", family, SIZE, _rng(k))
        surface = render_surface(family, SIZE, _rng(k))
        assert ok.dtype == np.uint8 and ok.shape == (SIZE, SIZE, 3)
        assert np.array_equal(ok, (surface * 255 + 0.5).astype(np.uint8))
    none = render_sample("marks", "none", SOURCE_FAMILIES[0], SIZE, _rng(5))
    assert np.array_equal(none, (render_surface(SOURCE_FAMILIES[0], SIZE, _rng(5)) * 255 + 0.5).astype(np.uint8))


# ------------------------------------------------------------------------------- defects, marks
def _paired_diff(task: str, base: str, label: str, family: str, seed: int) -> np.ndarray:
    a = render_sample(task, base, family, SIZE, _rng(seed)).astype(np.int16)
    b = render_sample(task, label, family, SIZE, _rng(seed)).astype(np.int16)
    return np.abs(a - b).max(-1)


@pytest.mark.parametrize("label", DEFECT_CLASSES[1:])
def test_defects_are_local_and_visible(label):
    """Same rng state with and without the defect: only a small region changes, and it changes a lot."""
    for family in TARGET_FAMILIES:
        for seed in range(3):
            d = _paired_diff("defects", "ok", label, family, seed)
            assert (d > 12).sum() >= 8, f"{label} on {family} (seed {seed}) is invisible"
            assert (d > 0).mean() < 0.3, f"{label} on {family} (seed {seed}) is not localized"
            ys, xs = np.nonzero(d > 12)
            cy, cx = ys.mean() / SIZE, xs.mean() / SIZE
            assert 0.15 < cy < 0.85 and 0.15 < cx < 0.85, "defect should sit mostly inside the frame"


@pytest.mark.parametrize("label", MARK_CLASSES[1:])
def test_marks_are_local_and_visible(label):
    for family in SOURCE_FAMILIES:
        for seed in range(2):
            d = _paired_diff("marks", "none", label, family, seed)
            assert (d > 12).sum() >= 8, f"{label} on {family} (seed {seed}) is invisible"
            assert (d > 0).mean() < 0.35


def test_defect_classes_differ_in_shape_not_only_in_amount():
    """Thin strokes (scratch, crack) cover little of the square their extent spans; blobs (hole, stain) fill it."""
    fill = {}
    for label in DEFECT_CLASSES[1:]:
        ratios = []
        for seed in range(8):
            d = _paired_diff("defects", "ok", label, TARGET_FAMILIES[seed % len(TARGET_FAMILIES)], seed) > 12
            ys, xs = np.nonzero(d)
            extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            ratios.append(d.sum() / extent**2)
        fill[label] = float(np.median(ratios))
    assert fill["hole"] > 2 * fill["scratch"] and fill["stain"] > 2 * fill["crack"]


def test_global_colour_statistics_do_not_give_the_label_away():
    """Softmax regression on per-image channel mean/std stays far from the accuracy a local model can reach."""
    feats, labels = [], []
    for ci, label in enumerate(DEFECT_CLASSES):
        for i in range(36):
            img = render_sample("defects", label, TARGET_FAMILIES[i % 6], 48, _rng(1000 * ci + i)).astype(np.float32) / 255
            feats.append(np.concatenate([img.mean((0, 1)), img.std((0, 1))]))
            labels.append(ci)
    x, y = np.array(feats), np.array(labels)
    x = (x - x.mean(0)) / x.std(0)
    order = _rng(0).permutation(len(y))
    tr, te = order[:120], order[120:]
    w, b = np.zeros((x.shape[1], 5)), np.zeros(5)
    onehot = np.eye(5)[y[tr]]
    for _ in range(800):
        z = x[tr] @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= 0.5 * (x[tr].T @ (p - onehot) / len(tr) + 1e-3 * w)
        b -= 0.5 * (p - onehot).mean(0)
    acc = ((x[te] @ w + b).argmax(1) == y[te]).mean()
    assert acc < 0.45, f"global colour stats predict the defect class too well ({acc:.2f})"


# ------------------------------------------------------------------------------------ validation
def test_unknown_names_raise_usage_error_naming_the_valid_ones():
    rng = _rng(0)
    with pytest.raises(UsageError, match="granit.*valid.*wood"):
        render_surface("granit", SIZE, rng)
    with pytest.raises(UsageError, match="dent.*valid.*scratch"):
        render_sample("defects", "dent", "wood", SIZE, rng)
    with pytest.raises(UsageError, match="line"):
        render_sample("defects", "line", "wood", SIZE, rng)  # a marks label is not a defect
    with pytest.raises(UsageError, match="segmentation.*defects"):
        render_sample("segmentation", "ok", "wood", SIZE, rng)
    with pytest.raises(UsageError, match="size"):
        render_surface("wood", 4, rng)
    for bad in (dict(task="nope"), dict(families=("wood", "plywood")), dict(families=()),
                dict(counts={"train": -1}), dict(counts={"../up": 1}), dict(counts={"train": 1.5}),
                dict(size=8), dict(seed=-1)):
        with pytest.raises(UsageError):
            SyntheticConfig(**bad)


def test_root_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        generate_dataset(tmp_path / "f", SyntheticConfig(counts={"train": 1}, size=16))


# --------------------------------------------------------------------------------------- on disk
def test_layout_counts_and_metadata(tmp_path):
    cfg = SyntheticConfig(counts={"train": 7, "val": 1}, size=48, seed=3)
    meta = generate_dataset(tmp_path, cfg)
    assert meta == json.loads((tmp_path / "dataset.json").read_text())
    assert meta["classes"] == list(DEFECT_CLASSES)
    assert meta["config"]["families"] == list(TARGET_FAMILIES)
    assert meta["num_images"] == 8 * len(DEFECT_CLASSES)
    assert meta["counts"] == {"train": dict.fromkeys(DEFECT_CLASSES, 7), "val": dict.fromkeys(DEFECT_CLASSES, 1)}
    for split, n in cfg.counts.items():
        for label in DEFECT_CLASSES:
            names = sorted(p.name for p in (tmp_path / split / label).iterdir())
            assert names == sorted(f"{TARGET_FAMILIES[i % 6]}_{i:05d}.png" for i in range(n))
    assert {p.name for p in tmp_path.iterdir()} == {"train", "val", "dataset.json"}
    assert all(p.suffix == ".png" for p in tmp_path.rglob("*") if p.is_file() and p.name != "dataset.json")
    with Image.open(tmp_path / "train" / "crack" / "leather_00005.png") as im:
        assert im.mode == "RGB" and im.size == (48, 48)


def test_marks_task_uses_its_own_classes_and_families(tmp_path):
    meta = generate_dataset(tmp_path, SyntheticConfig(task="marks", counts={"train": 1}, size=32))
    assert meta["classes"] == list(MARK_CLASSES)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == sorted(MARK_CLASSES)
    assert (tmp_path / "train" / "grid" / f"{SOURCE_FAMILIES[0]}_00000.png").is_file()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    cfg = SyntheticConfig(counts={"train": 2, "test": 1}, size=40, seed=11)
    generate_dataset(tmp_path / "a", cfg)
    generate_dataset(tmp_path / "b", cfg)
    generate_dataset(tmp_path / "c", SyntheticConfig(counts={"train": 2, "test": 1}, size=40, seed=12))
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b and len(a) == 15
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_changing_counts_does_not_reshuffle_other_images(tmp_path):
    generate_dataset(tmp_path / "small", SyntheticConfig(counts={"train": 2}, size=32))
    generate_dataset(tmp_path / "big", SyntheticConfig(counts={"val": 1, "train": 4}, size=32))
    small, big = _tree(tmp_path / "small"), _tree(tmp_path / "big")
    assert small and all(big[k] == v for k, v in small.items())


def test_early_return_when_config_matches(tmp_path):
    cfg = SyntheticConfig(counts={"train": 2}, size=32)
    first = generate_dataset(tmp_path, cfg)
    kept = tmp_path / "train" / "ok" / "brushed_metal_00000.png"
    gone = tmp_path / "train" / "hole" / "painted_plastic_00001.png"
    stamp, before = kept.stat().st_mtime_ns, kept.read_bytes()
    gone.unlink()
    assert generate_dataset(tmp_path, SyntheticConfig(counts={"train": 2}, size=32)) == first
    assert not gone.exists() and kept.stat().st_mtime_ns == stamp  # nothing was regenerated
    # another config regenerates, and removes images that the new config does not plan
    second = generate_dataset(tmp_path, SyntheticConfig(counts={"train": 1}, size=32, seed=1))
    assert second["config"]["seed"] == 1
    assert sorted(p.name for p in (tmp_path / "train" / "hole").iterdir()) == ["brushed_metal_00000.png"]
    assert kept.read_bytes() != before
    assert generate_dataset(tmp_path, SyntheticConfig(counts={"train": 1}, size=32, seed=1)) == second


def test_interrupted_run_is_not_mistaken_for_complete(tmp_path, monkeypatch):
    generate_dataset(tmp_path, SyntheticConfig(counts={"train": 1}, size=32))
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return np.zeros((32, 32, 3), np.uint8)

    monkeypatch.setattr(syn, "render_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path, SyntheticConfig(counts={"train": 1}, size=32, seed=5))
    assert not (tmp_path / "dataset.json").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()
    meta = generate_dataset(tmp_path, SyntheticConfig(counts={"train": 1}, size=32, seed=5))
    assert meta["config"]["seed"] == 5
    assert len(_tree(tmp_path)) == len(DEFECT_CLASSES)
    with Image.open(tmp_path / "train" / "ok" / "brushed_metal_00000.png") as im:
        assert np.asarray(im).std() > 0  # the zero image from the interrupted run was replaced


def test_switching_task_in_the_same_root_leaves_only_the_new_classes(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.png").write_bytes(b"not ours")
    generate_dataset(tmp_path, SyntheticConfig(task="marks", counts={"train": 1, "val": 1}, size=24))
    generate_dataset(tmp_path, SyntheticConfig(task="defects", counts={"train": 1}, size=24))
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == sorted(DEFECT_CLASSES)
    assert not (tmp_path / "val").exists()
    assert (tmp_path / "notes" / "keep.png").read_bytes() == b"not ours"


def test_progress_bar_runs(tmp_path):
    meta = generate_dataset(tmp_path, SyntheticConfig(counts={"train": 1}, size=24), progress=True)
    assert meta["num_images"] == len(DEFECT_CLASSES)
