"""A model no better than chance never ships quietly: train records chance and majority-class
baselines next to its accuracy; validate (parity.json/.md, CLI), bundle (manifest, CLI) and the
device side (verify, infer, BundleModel.warnings) carry the warning. A warning is not a failed gate:
the exit codes stay what the gates say."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from edgetransfer.baselines import assess, warning_of
from edgetransfer.bundle import read_manifest, write_bundle
from edgetransfer.cli import main
from edgetransfer.export import export_onnx
from edgetransfer.fsutil import sha256_file
from edgetransfer.spec import RunMeta
from edgetransfer.validate import validate

CLASSES = ["crack", "hole", "ok", "scratch", "stain"]
BALANCED_TRAIN = dict.fromkeys(CLASSES, 12)
BALANCED_TEST = dict.fromkeys(CLASSES, 40)  # 200 test images, like the demo


# ---- the rule ---------------------------------------------------------------------------------------

def test_accuracy_at_chance_is_flagged_with_both_baselines_named():
    r = assess(0.200, CLASSES, BALANCED_TRAIN, BALANCED_TEST)
    assert r["chance"] == pytest.approx(0.2) and r["majority"] == pytest.approx(0.2)
    assert r["samples"] == 200 and r["beats_baselines"] is False
    # two binomial standard errors of 0.2 on 200 images: 2 * sqrt(0.2 * 0.8 / 200) = 0.0566
    assert r["threshold"] == pytest.approx(0.2 + 2 * (0.2 * 0.8 / 200) ** 0.5)
    assert "0.200" in r["warning"] and "chance" in r["warning"] and "majority" in r["warning"]
    assert warning_of(r) == r["warning"]


def test_a_good_model_is_not_flagged():
    r = assess(0.60, CLASSES, BALANCED_TRAIN, BALANCED_TEST)
    assert r["beats_baselines"] is True and r["warning"] is None and warning_of(r) is None


def test_just_above_chance_is_not_enough_and_the_bar_falls_with_more_test_images():
    assert assess(0.24, CLASSES, BALANCED_TRAIN, BALANCED_TEST)["beats_baselines"] is False
    big = assess(0.24, CLASSES, BALANCED_TRAIN, dict.fromkeys(CLASSES, 1000))
    assert big["beats_baselines"] is True and big["margin"] < 0.02
    # 10 test images measure accuracy so roughly that 0.4 is still within the noise of guessing
    assert assess(0.40, CLASSES, BALANCED_TRAIN, dict.fromkeys(CLASSES, 2))["beats_baselines"] is False


def test_majority_class_comes_from_train_counts_and_is_measured_on_the_evaluated_split():
    train = {**BALANCED_TRAIN, "ok": 100}
    test = {**BALANCED_TEST, "ok": 140}  # 300 test images, 140 of them "ok"
    r = assess(0.50, CLASSES, train, test)
    assert r["majority_class"] == "ok" and r["majority"] == pytest.approx(140 / 300)
    assert r["baseline"] == pytest.approx(140 / 300) and r["beats_baselines"] is False  # 0.5 is not clearly above
    assert "'ok'" in r["warning"]
    assert assess(0.75, CLASSES, train, test)["beats_baselines"] is True


def test_tied_train_counts_take_the_conservative_majority():
    test = {**BALANCED_TEST, "stain": 80}
    assert assess(0.3, CLASSES, BALANCED_TRAIN, test)["majority_class"] == "stain"


def test_nothing_to_judge_is_none_not_a_verdict():
    assert assess(None, CLASSES, BALANCED_TRAIN, BALANCED_TEST)["beats_baselines"] is None
    assert assess(0.5, CLASSES, BALANCED_TRAIN, dict.fromkeys(CLASSES, 0))["beats_baselines"] is None
    assert warning_of(None) is None and warning_of({"beats_baselines": None}) is None


def test_the_record_is_strict_json():
    r = assess(0.2, CLASSES, BALANCED_TRAIN, BALANCED_TEST)
    assert json.loads(json.dumps(r, allow_nan=False)) == r


# ---- train records it --------------------------------------------------------------------------------

def test_training_records_baselines_next_to_test_accuracy(trained_run):
    meta = RunMeta.load(trained_run.run / "meta.json")
    m = meta.metrics
    b = m["baselines"]
    assert b["split"] == "test" and b["accuracy"] == m["test_accuracy"] and b["samples"] == m["test_samples"]
    assert b["chance"] == pytest.approx(1 / len(meta.classes))
    counts = meta.data["counts"]
    assert b == assess(m["test_accuracy"], meta.classes, counts["train"], counts["test"])
    assert b["beats_baselines"] == (m["test_accuracy"] > b["threshold"])


# ---- a constant model through validate -------------------------------------------------------------

def _make_constant(run, cls: int = 0) -> None:
    """Rewrite the run's head so that it answers class `cls` for every image, then export it again."""
    meta = json.loads((run / "meta.json").read_text())
    weights = load_file(str(run / "model.safetensors"))
    weights["fc.weight"].zero_()
    weights["fc.bias"].zero_()
    weights["fc.bias"][cls] = 1.0
    save_file(weights, str(run / "model.safetensors"), metadata={"backbone": meta["backbone"]})
    meta["weights_sha256"] = sha256_file(run / "model.safetensors")
    (run / "meta.json").write_text(json.dumps(meta))
    export_onnx(run)


def test_a_constant_model_passes_its_gates_but_validate_warns_everywhere(run_copy):
    _make_constant(run_copy)
    report = validate(run_copy)
    assert report.passed  # torch and ONNX agree perfectly on answering one class
    assert report.baselines["accuracy"] == pytest.approx(report.baselines["chance"])
    assert report.baselines["beats_baselines"] is False and len(report.warnings) == 1
    saved = json.loads((run_copy / "parity.json").read_text())
    assert saved["warnings"] == report.warnings and saved["baselines"]["beats_baselines"] is False
    md = (run_copy / "parity.md").read_text()
    assert "PASSED, 1 WARNING" in md.splitlines()[0] and "**WARNING:**" in md and "better than guessing" in md

    result = CliRunner().invoke(main, ["validate", str(run_copy)])
    assert result.exit_code == 0, result.output  # a warning, not a failed gate (DESIGN.md exit codes)
    assert "WARNING:" in result.stderr and "better than guessing" in result.stderr


# ---- bundle and the device carry it ------------------------------------------------------------------

def _bundleable(shipped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(shipped_run, run, ignore=shutil.ignore_patterns("jetson-*", "intel-cpu"))
    return run


def _set_parity_baselines(run, record) -> None:
    path = run / "x86-onnxruntime" / "parity.json"
    parity = json.loads(path.read_text())
    parity["baselines"] = record
    parity["warnings"] = [w] if (w := warning_of(record)) else []
    path.write_text(json.dumps(parity))


def test_bundle_manifest_and_device_side_carry_the_warning(shipped_run, tmp_path):
    run = _bundleable(shipped_run, tmp_path)
    flagged = assess(0.2, CLASSES, BALANCED_TRAIN, dict.fromkeys(CLASSES, 2), split="held-out")
    _set_parity_baselines(run, flagged)
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["bundle", str(run), "--target", "x86-onnxruntime", "--out", str(out),
                                       "--allow-failed"])
    assert result.exit_code == 0, result.output
    assert "WARNING:" in result.stderr and "better than guessing" in result.stderr
    m = read_manifest(out)
    assert m["warnings"] == [flagged["warning"]]
    assert m["parity"]["baselines"]["beats_baselines"] is False
    assert "baselines" in m["training"]

    verify = CliRunner().invoke(main, ["verify", str(out)])
    assert "better than guessing" in verify.stderr
    from edgetransfer.runtime import open_bundle

    with open_bundle(out) as model:
        assert model.warnings == [flagged["warning"]]


def test_infer_shows_the_warning(shipped_run, tmp_path, tiny_data):
    run = _bundleable(shipped_run, tmp_path)
    _set_parity_baselines(run, assess(0.2, CLASSES, BALANCED_TRAIN, dict.fromkeys(CLASSES, 2), split="held-out"))
    out = tmp_path / "b"
    write_bundle(run, "x86-onnxruntime", out, allow_failed=True)
    image = sorted((tiny_data / "test").rglob("*.png"))[0]
    result = CliRunner().invoke(main, ["infer", str(out), str(image)])
    assert result.exit_code == 0, result.output
    assert "WARNING:" in result.stderr and "better than guessing" in result.stderr


def test_a_good_model_bundles_without_warnings_and_training_fills_in_for_an_old_report(shipped_run, tmp_path):
    run = _bundleable(shipped_run, tmp_path)
    _set_parity_baselines(run, assess(0.9, CLASSES, BALANCED_TRAIN, BALANCED_TEST, split="held-out"))
    good = write_bundle(run, "x86-onnxruntime", tmp_path / "good", allow_failed=True)
    assert good.manifest["warnings"] == []

    # a parity.json from before baselines existed: the training record decides
    path = run / "x86-onnxruntime" / "parity.json"
    parity = json.loads(path.read_text())
    parity.pop("baselines"), parity.pop("warnings")
    path.write_text(json.dumps(parity))
    meta = json.loads((run / "meta.json").read_text())
    meta["metrics"]["baselines"] = assess(0.2, CLASSES, BALANCED_TRAIN, BALANCED_TEST)
    (run / "meta.json").write_text(json.dumps(meta))
    old = write_bundle(run, "x86-onnxruntime", tmp_path / "old", allow_failed=True)
    assert len(old.manifest["warnings"]) == 1 and old.manifest["warnings"][0].startswith("at training: test accuracy")
