"""Target profiles and calibration presets: every shipped file loads, the CLI lists and prints them,
and a hand-edited file with mistakes is refused with one error that lists every mistake (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgetransfer.cli import main
from edgetransfer.errors import UsageError
from edgetransfer.schema import MAX_YAML_BYTES, from_dict, to_dict
from edgetransfer.targets import (CalibrationPreset, Target, list_calibration_presets, list_targets, load_calibration,
                                  load_target)


def test_the_shipped_profiles_and_presets_are_found():
    assert {"x86-onnxruntime", "intel-cpu", "intel-igpu", "jetson-orin-nano", "jetson-agx-orin"} <= set(list_targets())
    assert {"default", "quick"} <= set(list_calibration_presets())


@pytest.mark.parametrize("name", list_targets())
def test_every_shipped_target_profile_loads_and_is_consistent(name):
    t = load_target(name)
    assert isinstance(t, Target)
    assert t.name == name  # its artifacts go to RUN/<name>/: the file name and the name must agree
    assert t.description and t.device
    assert 1 <= t.batch.min <= t.batch.opt <= t.batch.max
    if t.precision == "int8":
        assert t.quantization is not None
        assert load_calibration(t.quantization.calibration).name == t.quantization.calibration
    assert (t.tensorrt is not None) == (t.backend == "tensorrt")


@pytest.mark.parametrize("name", list_calibration_presets())
def test_every_calibration_preset_loads_and_never_uses_test_images(name):
    p = load_calibration(name)
    assert isinstance(p, CalibrationPreset)
    assert p.name == name
    assert p.samples >= 1 and p.splits and set(p.splits) <= {"train", "val"}


@pytest.mark.parametrize("name", ["jetson-orin-nano", "jetson-agx-orin", "jetson-xavier-nx"])
def test_jetson_profiles_quantize_the_way_tensorrt_runs(name):
    # TensorRT's explicit quantization runs signed INT8 with zero point 0, and DequantizeLinear on INT8 only
    t = load_target(name)
    assert t.backend == "tensorrt" and t.precision == "int8"
    assert t.quantization.activations == "symmetric" and t.quantization.bias == "float"
    assert t.tensorrt.major in (8, 10) and t.tensorrt.compute_capability in ("7.2", "8.7")


def test_a_tensorrt_section_with_bad_versions_and_dla_is_refused(tmp_path):
    profile = yaml.safe_load((Path(__file__).parents[1] / "targets/jetson-agx-orin.yaml").read_text())
    profile["tensorrt"].update(tensorrt="ten", compute_capability="87", use_dla=True, dla_core=2)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(UsageError) as info:
        load_target(path)
    text = str(info.value)
    for fragment in ("tensorrt.tensorrt: a version like '10.3', got 'ten'", "tensorrt.compute_capability: like '8.7'",
                     "tensorrt.dla_core: must be within [0, 1]"):
        assert fragment in text, text


def test_targets_cli_lists_every_profile():
    result = CliRunner().invoke(main, ["targets"])
    assert result.exit_code == 0, result.output
    for name in list_targets():
        assert name in result.output


@pytest.mark.parametrize("name", ["intel-cpu", "jetson-orin-nano"])
def test_targets_show_prints_yaml_that_round_trips(name):
    result = CliRunner().invoke(main, ["targets", "show", name])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert from_dict(Target, data) == load_target(name)
    assert to_dict(load_target(name)) == data


def test_unknown_target_name_is_exit_2_with_a_did_you_mean():
    result = CliRunner().invoke(main, ["targets", "show", "intel-cpuu"])
    assert result.exit_code == 2, result.output
    assert "intel-cpuu" in result.output and "did you mean 'intel-cpu'" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(UsageError) as info:
        load_target("jetson-orin-nan")
    assert info.value.exit_code == 2 and "did you mean 'jetson-orin-nano'" in str(info.value)


BAD_PROFILE = """\
name: bad
description: a profile with seven mistakes
thread: 4                       # typo of threads
backend: onnxrutime             # not a backend
# device: missing
precision: int8                 # ... and no quantization block
batch: {min: 1, opt: 1, max: eight}
gates:
  quantization: {min_agreement: 1.5}
tensorrt:                       # on an onnxruntime profile
  jetpack: "6.2"
  tensorrt: "10.3"
  compute_capability: "8.7"
  gpu: Orin
"""


def test_a_bad_profile_reports_every_problem_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_PROFILE)
    with pytest.raises(UsageError) as info:
        load_target(path)
    err = info.value
    assert err.exit_code == 2
    assert err.path == path
    text = str(err)
    assert str(path) in text
    expected = [
        "thread: unknown key (did you mean 'threads'?)",                    # typo'd key
        "batch.max: expected an integer, got 'eight'",                      # wrong type
        "gates.quantization.min_agreement: must be within [0, 1], got 1.5",  # out of range
        "backend: 'onnxrutime' is not one of",                              # invalid choice
        "did you mean 'onnxruntime'?",
        "device: required",                                                 # missing key
        "quantization: required when precision is int8",                    # int8 without quantization
        "tensorrt: only for the tensorrt backend",                          # tensorrt block elsewhere
    ]
    for fragment in expected:
        assert fragment in text, f"{fragment!r} missing from:\n{text}"
    assert len([line for line in text.splitlines() if line.strip().startswith("- ")]) == 7, text

    result = CliRunner().invoke(main, ["targets", "show", str(path)])
    assert result.exit_code == 2
    assert str(path) in result.output and "gates.quantization.min_agreement" in result.output
    assert "Traceback" not in result.output


def test_cross_field_checks_do_not_fire_on_a_field_that_is_itself_wrong(tmp_path):
    # a broken quantization block must not also be reported as "required" (it is there, just wrong)
    path = tmp_path / "t.yaml"
    path.write_text("name: t\ndescription: d\nbackend: onnxruntime\ndevice: cpu\nprecision: int8\n"
                    "quantization: {activations: symetric}\n")
    with pytest.raises(UsageError) as info:
        load_target(path)
    text = str(info.value)
    assert "quantization.activations: 'symetric' is not one of" in text and "did you mean 'symmetric'" in text
    assert "required when precision is int8" not in text


def test_yaml_anchors_and_aliases_are_refused(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("name: a\ndescription: d\nbackend: onnxruntime\ndevice: cpu\nprecision: fp32\n"
                    "gates:\n  export: &g {min_agreement: 1.0}\n  compiler: *g\n")
    with pytest.raises(UsageError) as info:
        load_target(path)
    assert info.value.exit_code == 2
    assert "anchors/aliases" in str(info.value) and str(path) in str(info.value)


def test_a_python_object_tag_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.yaml"
    path.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n'
                    "description: d\nbackend: onnxruntime\ndevice: cpu\nprecision: fp32\n")
    with pytest.raises(UsageError) as info:
        load_target(path)
    assert info.value.exit_code == 2 and str(path) in str(info.value)
    assert not marker.exists()
    result = CliRunner().invoke(main, ["targets", "show", str(path)])
    assert result.exit_code == 2 and not marker.exists()


def test_a_huge_profile_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("name: huge\n" + "# padding\n" * (MAX_YAML_BYTES // 10 + 10))
    assert path.stat().st_size > MAX_YAML_BYTES
    with pytest.raises(UsageError) as info:
        load_target(path)
    assert str(path) in str(info.value) and str(MAX_YAML_BYTES) in str(info.value)


def test_a_bad_calibration_preset_lists_its_problems(tmp_path):
    path = tmp_path / "calib.yaml"
    path.write_text("name: c\nsamples: 0\nsplits: [train, test]\nmethod: minmax\npercentil: 99\n")
    with pytest.raises(UsageError) as info:
        load_calibration(path)
    text = str(info.value)
    assert str(path) in text
    assert "samples: must be >= 1" in text
    assert "splits[1]: 'test' is not one of 'train' | 'val'" in text
    assert "percentil: unknown key (did you mean 'percentile'?)" in text


def test_a_profile_that_is_not_utf8_is_refused(tmp_path):
    from edgetransfer.errors import UsageError
    from edgetransfer.targets import load_target

    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\u00e9\ndescription: x\n".encode("latin-1"))
    with pytest.raises(UsageError) as err:
        load_target(bad)
    assert err.value.exit_code == 2 and "UTF-8" in str(err.value) and str(bad) in str(err.value)
