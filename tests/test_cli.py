"""The command line's contract: help without heavy imports, listing, exit codes with clear messages,
and the quick demo end to end (the one slow test here: every stage and the second act, about a minute on two cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edgetransfer.cli import main


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "export", "validate", "demo", "backbones"):
        assert command in result.output
    sub = CliRunner().invoke(main, ["train", "--help"])
    assert sub.exit_code == 0 and "--weights" in sub.output and "--resume" in sub.output


def test_help_does_not_import_torch_or_a_backend():
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from edgetransfer.cli import main\n"
            "r = CliRunner().invoke(main, ['--help'])\n"
            "assert r.exit_code == 0, r.output\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'onnx', 'onnxruntime') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_backbones_lists_names():
    result = CliRunner().invoke(main, ["backbones", "--no-timm", "--names"])
    assert result.exit_code == 0
    names = result.output.split()
    for name in ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "swin_t"):
        assert name in names
    assert "googlenet" not in names


def test_train_on_a_missing_folder_is_exit_2_naming_it(tmp_path):
    missing = tmp_path / "no_such_dataset"
    result = CliRunner().invoke(main, ["train", str(missing), "--weights", "none", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert str(missing) in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_train_with_an_unknown_backbone_is_exit_2(tiny_data, tmp_path):
    result = CliRunner().invoke(main, ["train", str(tiny_data), "--backbone", "resnet19", "--weights", "none",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "resnet19" in result.output


def test_bad_flag_values_are_usage_errors(tmp_path):
    result = CliRunner().invoke(main, ["train", str(tmp_path), "--mode", "probe", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "probe" in result.output
    result = CliRunner().invoke(main, ["train", str(tmp_path), "--epochs", "0", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    # the quick model is barely trained and its test set is 15 images, so one flipped image breaks the
    # INT8 gates: the contract checked here is that the exit code says exactly whether every gate passed
    target_rows = [t for t in summary["targets"] if t["passed"] is not None]
    anomaly_rows = [t for t in summary["anomaly"]["targets"] if t["passed"] is not None]
    all_passed = summary["parity_passed"] and all(t["passed"] for t in target_rows + anomaly_rows)
    assert result.exit_code == (0 if all_passed else 1), result.output
    assert {t["target"] for t in summary["targets"]} == {"intel-cpu", "x86-onnxruntime"}
    for t in target_rows:
        assert (out / summary["exported"].split("/")[-1] / t["target"] / "parity.json").exists()
        assert 0.0 <= t["accuracy"] <= 1.0 and t["latency_ms"] > 0
    text = " ".join(result.output.split())
    assert "transfer vs. training from scratch" in text
    for row in ("transfer, features (frozen)", "transfer, finetune", "from scratch"):
        assert row in text
    assert "parity" in text and "export fidelity" in text and "pass" in text
    assert summary["parity_passed"] is True
    assert [m["name"] for m in summary["models"]] == ["transfer, finetune", "transfer, features (frozen)",
                                                      "from scratch"]
    assert [m["pretraining"] for m in summary["models"]] == ["ImageNet-1k (packaged)"] * 2 + ["none"]
    assert json.loads((out / "transfer-finetune" / "meta.json").read_text())["weights"] == "efficientnet_lite0.IMAGENET1K"
    assert json.loads((out / "scratch" / "meta.json").read_text())["weights"] == "none"
    assert all(0.0 <= m["test_accuracy"] <= 1.0 for m in summary["models"])
    exported = out / summary["exported"].split("/")[-1]
    assert (exported / "model.onnx").exists() and (exported / "parity.md").exists()
    parity = json.loads((exported / "parity.json").read_text())
    assert parity["passed"] is True
    # the demo ends on the device side: bundle, verify, infer
    bundle = summary["bundle"]
    assert bundle["verify_passed"] is True and bundle["golden_agreement"] == 1.0
    assert (out / "bundle-intel-cpu" / "manifest.json").exists() and (out / "bundle-intel-cpu.tar.gz").exists()
    assert len(bundle["predictions"]) == 5 and {p["class"] for p in bundle["predictions"]} <= set(parity["classes"])
    assert "shipped" in text and bundle["digest"] and "verify passed" in text
    # the second act: an anomaly scorer from the good images only, through the same targets
    anomaly = summary["anomaly"]
    assert set(anomaly["per_type"]) == {"crack", "hole", "scratch", "stain"}
    assert {t["target"] for t in anomaly["targets"]} == {"intel-cpu"}  # the quick run: the shipped target
    for t in anomaly_rows:
        assert (out / "anomaly" / t["target"] / "parity.json").exists() and 0.0 <= t["auroc"] <= 1.0
    assert Path(anomaly["maps"]).stat().st_size > 0 and "second act" in text
