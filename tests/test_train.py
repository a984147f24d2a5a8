"""adapt/: freeze policies, the training loop, the run folder it writes, determinism and --resume.

Training runs for real on the tiny generated dataset (see conftest.py). The resume test interrupts a
real `edgetransfer train` process with SIGKILL, so nothing about the interruption is simulated.
"""

from __future__ import annotations

import json
import math
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
from safetensors.torch import load_file
from torch import nn

from edgetransfer.adapt.freeze import apply_mode, param_groups
from edgetransfer.adapt.train import TrainConfig, Trainer, train
from edgetransfer.backbones import create
from edgetransfer.cli import main
from edgetransfer.data.folder import dataset_hash, scan_dataset
from edgetransfer.errors import UsageError

from .conftest import DATA_COUNTS, RUN_CONFIG, cli_train_args


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _bn_names(model: nn.Module, modules: list[nn.Module]) -> set[str]:
    ids = {id(m) for m in modules}
    return {n for n, m in model.named_modules() if id(m) in ids}


def _all_bn(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0 or not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# ---- freeze policies ------------------------------------------------------------------------------

def test_features_mode_trains_only_the_head_and_freezes_every_norm():
    bb = create("resnet18", 3, weights="none", img_size=32)
    frozen = apply_mode(bb.model, bb.head, "features")
    assert _trainable(bb.model) == {"fc.weight", "fc.bias"}
    assert _bn_names(bb.model, frozen) == _all_bn(bb.model) and len(frozen) == 20


def test_partial_mode_trains_exactly_the_last_stages_and_the_head():
    bb = create("resnet18", 3, weights="none", img_size=32)
    frozen = apply_mode(bb.model, bb.head, "partial", unfreeze_stages=2)
    names = [n for n, _ in bb.model.named_parameters()]
    assert _trainable(bb.model) == {n for n in names if n.startswith(("layer3.", "layer4.", "fc."))}
    assert _bn_names(bb.model, frozen) == {n for n in _all_bn(bb.model) if n.startswith(("bn1", "layer1.", "layer2."))}

    mnv3 = create("mobilenet_v3_small", 3, weights="none", img_size=32)
    apply_mode(mnv3.model, mnv3.head, "partial", unfreeze_stages=1)
    names = [n for n, _ in mnv3.model.named_parameters()]
    last = f"features.{len(mnv3.model.features) - 1}."
    # the last stage and everything after it (the whole classifier, head included) learn
    assert _trainable(mnv3.model) == {n for n in names if n.startswith((last, "classifier."))}
    assert any(n.startswith("features.0.") for n in names)

    with pytest.raises(UsageError) as info:
        apply_mode(bb.model, bb.head, "partial", unfreeze_stages=5)  # resnet18 has 4 stages
    assert info.value.field == "unfreeze_stages"
    with pytest.raises(UsageError):
        apply_mode(bb.model, bb.head, "linear-probe")


def test_finetune_mode_trains_everything_with_separate_head_and_backbone_groups():
    bb = create("resnet18", 3, weights="none", img_size=32)
    apply_mode(bb.model, bb.head, "features")  # switching back must unfreeze everything again
    assert apply_mode(bb.model, bb.head, "finetune") == []
    params = dict(bb.model.named_parameters())
    assert _trainable(bb.model) == set(params)
    groups = param_groups(bb.model, bb.head, lr=1e-2, backbone_lr=1e-2 * 0.1, weight_decay=0.05)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(params)  # every parameter exactly once
    by_id = {id(p): n for n, p in params.items()}
    for g in groups:
        names = {by_id[id(p)] for p in g["params"]}
        is_head = g["name"].startswith("head")
        assert all(n.startswith("fc.") == is_head for n in names)
        assert g["lr"] == pytest.approx(1e-2 if is_head else 1e-3)
        no_decay = g["name"].endswith("no_decay")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05)
        assert all((params[n].ndim <= 1) == no_decay for n in names)


@pytest.mark.parametrize("weights, mult, expected", [("none", None, 1.0), ("file", None, 0.1), ("none", 0.25, 0.25)])
def test_trainer_backbone_lr_is_lr_times_mult(tiny_data, tmp_path, weights, mult, expected):
    if weights == "file":  # any pretrained weights make the default multiplier 0.1
        torch.manual_seed(0)
        path = tmp_path / "init.pth"
        torch.save(create("resnet18", 5, weights="none", img_size=32).model.state_dict(), path)
        weights = str(path)
    config = TrainConfig(**{**RUN_CONFIG, "weights": weights, "backbone_lr_mult": mult, "lr": 0.02})
    splits = scan_dataset(tiny_data, verify=False)
    bb = create("resnet18", len(splits.classes), weights=config.weights, img_size=32)
    trainer = Trainer(splits, bb, config, tmp_path / "run")
    lrs = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert lrs["head"] == pytest.approx(0.02) and lrs["head/no_decay"] == pytest.approx(0.02)
    assert lrs["backbone"] == pytest.approx(0.02 * expected)
    assert lrs["backbone/no_decay"] == pytest.approx(0.02 * expected)


# ---- the run folder -------------------------------------------------------------------------------

def test_run_folder_holds_weights_meta_metrics_and_split(trained_run, tiny_data):
    run = trained_run.run
    meta = json.loads((run / "meta.json").read_text())
    classes_on_disk = sorted(p.name for p in (tiny_data / "train").iterdir() if p.is_dir())
    assert meta["classes"] == classes_on_disk and len(classes_on_disk) == 5
    assert meta["backbone"] == "resnet18" and meta["mode"] == "finetune" and meta["weights"] == "none"
    assert meta["input_spec"]["height"] == meta["input_spec"]["width"] == 32
    assert meta["data"]["hash"] == dataset_hash(scan_dataset(tiny_data, verify=False))
    assert len(meta["data"]["hash"]) == 64
    m = meta["metrics"]
    n_test = sum(1 for _ in (tiny_data / "test").rglob("*.png"))
    assert n_test == 5 * DATA_COUNTS["test"]
    assert m["test_samples"] == n_test
    assert 0.0 <= m["test_accuracy"] <= 1.0
    assert m["epochs_run"] == RUN_CONFIG["epochs"]
    assert 0 <= m["best_epoch"] < RUN_CONFIG["epochs"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(RUN_CONFIG["epochs"]))
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows)
    assert rows[m["best_epoch"]]["val_accuracy"] == pytest.approx(m["val_accuracy"])
    split = json.loads((run / "split.json").read_text())
    assert split["sources"] == {"train": "disk", "val": "disk", "test": "disk"}
    assert sum(split["counts"]["test"].values()) == n_test
    weights = load_file(str(run / "model.safetensors"))
    assert weights["fc.weight"].shape == (5, 512)
    assert json.loads((run / "checkpoints" / "last.json").read_text())["epoch"] == RUN_CONFIG["epochs"] - 1
    assert not list(run.rglob("*.tmp"))  # atomic writes leave no temporaries behind


def _last_weights(run: Path) -> str:
    """The newest resumable checkpoint's weights, as named by checkpoints/last.json."""
    index = json.loads((run / "checkpoints" / "last.json").read_text())
    return "checkpoints/" + next(n for n in index["sha256"] if n.endswith(".safetensors"))


def test_training_changes_the_weights_and_is_deterministic(trained_run, tiny_data, tmp_path):
    again = train(tiny_data, tmp_path / "again", TrainConfig(**RUN_CONFIG))
    first = trained_run.run
    for name in ("model.safetensors", _last_weights(first)):
        _assert_same_tensors(load_file(str(first / name)), load_file(str(again.run / name)))
    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(first) == rows(again.run)
    assert again.meta.metrics == trained_run.meta.metrics
    # identical because seeded, not because nothing moved: the weights left their seeded init
    torch.manual_seed(RUN_CONFIG.get("seed", 0))
    init = create("resnet18", 5, weights="none", img_size=32).model.state_dict()
    final = load_file(str(first / _last_weights(first)))
    assert not torch.equal(init["conv1.weight"], final["conv1.weight"])
    assert not torch.equal(init["layer1.0.bn1.running_mean"], final["layer1.0.bn1.running_mean"])


def test_resume_after_sigkill_gives_the_uninterrupted_result(trained_run, tiny_data, tmp_path):
    out = tmp_path / "killed"
    index = out / "checkpoints" / "last.json"
    env = {**os.environ, "EDGETRANSFER_PROGRESS": "0"}
    log = tmp_path / "train.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "edgetransfer", *cli_train_args(tiny_data, out)], env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not index.exists():  # last.json is written atomically, last, after every epoch
            if proc.poll() is not None:
                pytest.fail(f"training exited early ({proc.returncode}): {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no epoch finished within 180 s")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    done = json.loads(index.read_text())["epoch"]
    assert done < RUN_CONFIG["epochs"] - 1
    assert "test_accuracy" not in json.loads((out / "meta.json").read_text())["metrics"]

    result = CliRunner().invoke(main, [*cli_train_args(tiny_data, out), "--resume"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output

    first = trained_run.run
    for name in ("model.safetensors", _last_weights(first)):
        _assert_same_tensors(load_file(str(first / name)), load_file(str(out / name)), atol=1e-6)
    resumed_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in resumed_rows] == list(range(RUN_CONFIG["epochs"]))
    for a, b in zip(resumed_rows, straight_rows):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_accuracy"] == b["val_accuracy"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["metrics"]["best_epoch"] == trained_run.meta.metrics["best_epoch"]
    assert meta["metrics"]["test_accuracy"] == pytest.approx(trained_run.meta.metrics["test_accuracy"])


# ---- refusing to clobber or to resume something else --------------------------------------------

def test_non_empty_out_without_resume_is_exit_2(tiny_data, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, cli_train_args(tiny_data, out))
    assert result.exit_code == 2, result.output
    assert str(out) in result.output and "not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("override, field", [({"lr": 0.5}, "lr"), ({"epochs": 4}, "epochs"),
                                             ({"mode": "features"}, "mode")])
def test_resume_with_other_settings_is_exit_2_naming_the_field(trained_run, tiny_data, tmp_path, override, field):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy2(trained_run.run / "train_config.json", out / "train_config.json")
    result = CliRunner().invoke(main, [*cli_train_args(tiny_data, out, **override), "--resume"])
    assert result.exit_code == 2, result.output
    assert f"different settings than the interrupted run: {field}" in " ".join(result.output.split())
    # the data folder is part of the settings too
    other = tmp_path / "data-copy"
    shutil.copytree(tiny_data, other)
    result = CliRunner().invoke(main, [*cli_train_args(other, out), "--resume"])
    assert result.exit_code == 2 and "data" in result.output


def test_resume_without_a_run_is_exit_2(tiny_data, tmp_path):
    result = CliRunner().invoke(main, [*cli_train_args(tiny_data, tmp_path / "never"), "--resume"])
    assert result.exit_code == 2 and "train_config.json" in result.output


# ---- features mode: the backbone is untouched, the head learns ------------------------------------

@pytest.fixture(scope="module")
def features_run(trained_run, tiny_data, tmp_path_factory):
    """Head-only transfer from the shared run: cached embeddings make many epochs cheap."""
    config = TrainConfig(**{**RUN_CONFIG, "weights": str(trained_run.run), "mode": "features", "epochs": 8,
                            "lr": 0.05, "patience": 100})
    return train(tiny_data, tmp_path_factory.mktemp("features") / "run", config)


def test_features_mode_leaves_backbone_weights_and_bn_stats_byte_identical(features_run, trained_run):
    source = load_file(str(trained_run.run / "model.safetensors"))
    adapted = load_file(str(features_run.run / "model.safetensors"))
    body = [k for k in source if not k.startswith("fc.")]
    assert any(k.endswith("running_mean") for k in body) and any(k.endswith("running_var") for k in body)
    for k in body:
        assert torch.equal(source[k], adapted[k]), f"{k} changed in features mode"
    # ...while the head did change (the classes are the same, so it started from the source head)
    assert not torch.equal(source["fc.weight"], adapted["fc.weight"])
    assert features_run.meta.weights == str(trained_run.run) and features_run.meta.mode == "features"


def test_features_mode_learns(features_run):
    rows = features_run.history
    assert len(rows) == 8
    first, last = rows[0], rows[-1]
    # robust to noise: the last three epochs' mean loss is clearly below the first epoch's
    tail = sum(r["train_loss"] for r in rows[-3:]) / 3
    assert tail < first["train_loss"] - 0.1, [round(r["train_loss"], 3) for r in rows]
    assert last["train_accuracy"] > max(first["train_accuracy"], 1 / 5 + 0.1)


def test_surface_augmentation_keeps_every_pixel_of_the_deployed_view(tiny_data):
    """Without jitter, a training view is the deployment view turned or flipped: nothing is cropped
    away, so a defect at the border keeps its label."""
    from edgetransfer.adapt.loader import AugmentedImages, Augmentation
    from edgetransfer.data.folder import scan_dataset
    from edgetransfer.preprocess import load_image, preprocess
    from edgetransfer.spec import InputSpec

    splits = scan_dataset(tiny_data, seed=0)
    spec = InputSpec(height=32, width=32, resize_mode="letterbox")
    views = AugmentedImages(splits.train[:6], spec, seed=1, augment=Augmentation(brightness=0.0, contrast=0.0))
    turned = 0
    for i, sample in enumerate(splits.train[:6]):
        deployed = torch.from_numpy(preprocess(load_image(sample.path), spec))
        x, label, index = views[(3, i)]
        assert label == sample.label and index == i
        candidates = [torch.rot90(d, k, (1, 2)) for d in (deployed, deployed.flip(2)) for k in range(4)]
        assert any(torch.equal(x, c) for c in candidates)
        turned += not torch.equal(x, deployed)
        assert torch.equal(x, views[(3, i)][0])  # seeded by (seed, epoch, index)
    assert turned >= 3, "flips and quarter turns should change most views"


@pytest.mark.parametrize("bn, weights, batch, images, frozen", [
    ("auto", "default", 8, 10_000, True), ("auto", "default", 32, 10_000, False), ("auto", "default", 32, 250, True),
    ("auto", "none", 8, 250, False), ("frozen", "none", 64, 10_000, True), ("train", "default", 4, 250, False)])
def test_bn_policy(bn, weights, batch, images, frozen):
    assert TrainConfig(bn=bn, weights=weights, batch_size=batch).bn_frozen(1, images) is frozen


def test_frozen_bn_statistics_stay_while_the_rest_learns(tiny_data, tmp_path):
    out = train(tiny_data, tmp_path / "run", TrainConfig(**{**RUN_CONFIG, "bn": "frozen", "epochs": 1}))
    trained = load_file(out.run / "model.safetensors")
    torch.manual_seed(0)
    start = create("resnet18", 5, weights="none", img_size=32).model.state_dict()
    stats = [k for k in trained if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(trained[k], start[k]) for k in stats)
    assert not torch.equal(trained["conv1.weight"], start["conv1.weight"])


def test_unknown_recipe_choices_are_usage_errors():
    for kw, field in ((dict(resize="squash"), "resize"), (dict(augment="heavy"), "augment"), (dict(bn="sync"), "bn"),
                      (dict(mean=(0.5, 0.5, 0.5)), "std"), (dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.0, 0.5)), "std")):
        with pytest.raises(UsageError) as ei:
            TrainConfig(**kw)
        assert ei.value.field == field
