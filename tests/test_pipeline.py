"""Recipes end to end through the CLI (`edgetransfer run recipe.yaml`): train → export → quantize →
compile → validate per target; a target whose runtime is absent is skipped with the reason; a second
run reuses the finished training; a typo in the recipe is exit 2 before anything runs."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from edgetransfer.cli import main

TRAIN = {"backbone": "resnet18", "img_size": 32, "epochs": 1, "weights": "none", "batch_size": 8}


def _recipe(folder, data, **overrides):
    recipe = {"data": str(data), "out": "run", "train": dict(TRAIN),
              "targets": ["x86-onnxruntime", "jetson-orin-nano"], "calibration": "quick", **overrides}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _check_run(result, run):
    summary = json.loads((run / "recipe-summary.json").read_text())
    ran = summary["targets"]
    assert [r["target"] for r in ran] == ["x86-onnxruntime"]
    assert summary["passed"] == (summary["fp32_export_passed"] and all(r["passed"] for r in ran))
    # the exit code says exactly whether every target that ran (and the fp32 export) passed
    assert result.exit_code == (0 if summary["passed"] else 1), result.output
    assert "Traceback" not in result.output

    x86 = ran[0]
    assert isinstance(x86["passed"], bool) and x86["quantizer"] == "onnxruntime"
    assert x86["precision"] == "int8" and x86["latency_ms"] > 0
    parity = json.loads((run / "x86-onnxruntime" / "parity.json").read_text())
    assert parity["passed"] is x86["passed"]
    # a failed gate names its report and gates, in the summary and in the output
    assert bool(x86["failures"]) is not x86["passed"]
    failing = [f["report"] for f in summary["failing_reports"]]
    assert (x86["report"] in failing) is not x86["passed"]
    if not x86["passed"]:
        assert f"FAILED: {x86['report']}" in result.stderr
    assert (run / "x86-onnxruntime" / "compiled.json").is_file()

    [skipped] = summary["skipped"]
    assert skipped["target"] == "jetson-orin-nano" and skipped["passed"] is None
    assert "TensorRT" in skipped["skipped"]
    # the INT8 model for the device is still made: it is what a TensorRT build on the device starts from
    assert (run / "jetson-orin-nano" / "model.int8.onnx").is_file()
    assert not (run / "jetson-orin-nano" / "compiled.json").exists()
    return summary


def test_a_recipe_runs_every_stage_and_a_second_run_reuses_the_training(tiny_data, tmp_path):
    recipe = _recipe(tmp_path, tiny_data)
    run = tmp_path / "run"  # `out` is relative to the recipe's folder
    first = CliRunner().invoke(main, ["run", str(recipe)])
    _check_run(first, run)
    assert json.loads((run / "train_config.json").read_text())["epochs"] == 1
    assert "x86-onnxruntime" in first.output

    weights, onnx_file = run / "model.safetensors", run / "model.onnx"
    stamps = (weights.stat().st_mtime_ns, onnx_file.stat().st_mtime_ns)
    second = CliRunner().invoke(main, ["run", str(recipe)])
    _check_run(second, run)
    assert (weights.stat().st_mtime_ns, onnx_file.stat().st_mtime_ns) == stamps  # not retrained, not re-exported
    assert "reusing" in second.output


def test_a_finished_run_on_other_images_is_refused_not_reused_nor_overwritten(tiny_data, tmp_path):
    """Same settings, same folder, but an image was replaced after training: reusing the run would report on
    a model trained on other images."""
    import shutil

    import numpy as np
    from PIL import Image

    from edgetransfer.adapt.train import TrainConfig
    from edgetransfer.errors import UsageError
    from edgetransfer.pipeline import train_or_reuse

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    config = TrainConfig(**{**TRAIN, "epochs": 1})
    run = tmp_path / "run"
    first = train_or_reuse(data, run, config)
    weights = (run / "model.safetensors").read_bytes()
    assert train_or_reuse(data, run, config).meta.data["hash"] == first.meta.data["hash"]  # same images: reused
    assert (run / "model.safetensors").read_bytes() == weights

    image = sorted((data / "train").rglob("*.png"))[0]
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    with pytest.raises(UsageError, match="trained on other images") as refused:
        train_or_reuse(data, run, config)
    assert first.meta.data["hash"][:12] in str(refused.value)
    assert (run / "model.safetensors").read_bytes() == weights  # nothing overwritten
    shutil.copytree(data / "train" / "ok", data / "train" / "dent")  # a class the run never had
    with pytest.raises(UsageError, match="trained on other images.*dent"):
        train_or_reuse(data, run, config)
    assert (run / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("change, field, hint", [
    ({"calibraton": "quick"}, "calibraton", "calibration"),
    ({"train": {**TRAIN, "epoch": 1}}, "train.epoch", "epochs"),
])
def test_a_recipe_with_a_typo_is_exit_2_naming_the_file_and_key(tiny_data, tmp_path, change, field, hint):
    recipe = _recipe(tmp_path, tiny_data, **change)
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 2, result.output
    assert str(recipe) in result.output
    assert f"{field}: unknown key (did you mean '{hint}'?)" in result.output
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_a_recipe_naming_an_unknown_target_is_exit_2(tiny_data, tmp_path):
    recipe = _recipe(tmp_path, tiny_data, targets=["x86-onnxruntim"])
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "x86-onnxruntim" in result.output and "did you mean 'x86-onnxruntime'" in result.output


def test_recipe_paths_resolve_next_to_the_recipe_and_names_stay_names(tmp_path):
    from edgetransfer.pipeline import _near

    assert _near(tmp_path, "data/line3") == str(tmp_path / "data/line3")
    assert _near(tmp_path, "profiles/mine.yaml", yaml_only=True) == str(tmp_path / "profiles/mine.yaml")
    assert _near(tmp_path, "intel-cpu", yaml_only=True) == "intel-cpu"
    assert _near(tmp_path, "/abs/elsewhere") == "/abs/elsewhere"
    assert _near(tmp_path, None) is None
