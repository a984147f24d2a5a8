"""The contract that travels with every artifact: InputSpec, RunMeta, and the errors' exit codes."""

from __future__ import annotations

import json

import pytest

from edgetransfer.errors import (DataError, DependencyError, EdgeTransferError, GateFailed, IntegrityError,
                                 UsageError)
from edgetransfer.spec import SCHEMA_VERSION, InputSpec, RunMeta


def _meta(**overrides) -> RunMeta:
    kw = dict(classes=["ok", "scratch", "hole"], input_spec=InputSpec.square(32, color_order="BGR"),
              backbone="resnet18", weights="none", mode="features",
              data={"root": "/data", "hash": "ab" * 32}, metrics={"test_accuracy": 0.5},
              train_config={"epochs": 2})
    kw.update(overrides)
    return RunMeta(**kw)


def test_exit_codes_follow_design():
    assert GateFailed("x").exit_code == 1
    assert UsageError("x").exit_code == 2
    assert DataError("x").exit_code == 2 and isinstance(DataError("x"), UsageError)
    assert DependencyError("x").exit_code == 3
    assert IntegrityError("x").exit_code == 4
    assert all(issubclass(c, EdgeTransferError) for c in (GateFailed, UsageError, DependencyError, IntegrityError))


def test_error_message_names_path_and_field(tmp_path):
    err = UsageError("bad value", path=tmp_path / "cfg.yaml", field="lr")
    assert str(tmp_path / "cfg.yaml") in str(err) and "field 'lr'" in str(err) and "bad value" in str(err)
    assert err.field == "lr" and err.path == tmp_path / "cfg.yaml"


def test_input_spec_round_trip_through_json():
    spec = InputSpec(height=48, width=40, resize_size=56, resize_mode="stretch", interpolation="bicubic",
                     color_order="BGR", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    d = json.loads(json.dumps(spec.to_dict()))
    back = InputSpec.from_dict(d)
    assert back == spec
    assert back.mean == (0.1, 0.2, 0.3) and isinstance(back.mean, tuple)
    assert back.to_dict() == spec.to_dict()
    assert back != InputSpec.from_dict({**d, "color_order": "RGB"})


def test_square_spec_uses_evaluation_crop_ratio():
    spec = InputSpec.square(224)
    assert (spec.height, spec.width, spec.resize_size) == (224, 224, 256)
    assert InputSpec.square(32).resize_size == round(32 / 0.875)


def test_input_spec_unknown_key_is_rejected_with_its_name(tmp_path):
    d = {**InputSpec.square(32).to_dict(), "colour_order": "RGB"}
    with pytest.raises(UsageError) as info:
        InputSpec.from_dict(d, source=tmp_path / "meta.json")
    assert "colour_order" in str(info.value)
    assert info.value.field == "input_spec"
    assert str(tmp_path / "meta.json") in str(info.value)


@pytest.mark.parametrize("overrides, field", [
    ({"resize_mode": "squash"}, "input_spec.resize_mode"),
    ({"interpolation": "lanczos9"}, "input_spec.interpolation"),
    ({"height": 4}, "input_spec.height"),
    ({"resize_size": 16}, "input_spec.resize_size"),
    ({"std": (0.2, 0.0, 0.2)}, "input_spec.std"),
])
def test_input_spec_bad_values_name_the_field(overrides, field):
    with pytest.raises(UsageError) as info:
        InputSpec.from_dict({**InputSpec.square(32).to_dict(), **overrides})
    assert info.value.field == field


def test_run_meta_round_trip(tmp_path):
    meta = _meta()
    path = meta.save(tmp_path / "meta.json")
    back = RunMeta.load(path)
    assert back == meta
    assert back.input_spec.color_order == "BGR"
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION


def test_run_meta_from_the_future_is_refused(tmp_path):
    d = _meta().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(d))
    with pytest.raises(IntegrityError) as info:
        RunMeta.load(path)
    assert info.value.exit_code == 4
    assert info.value.field == "schema_version"
    assert str(SCHEMA_VERSION + 1) in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("key", ["classes", "input_spec", "backbone", "mode"])
def test_run_meta_missing_key_names_it(tmp_path, key):
    d = _meta().to_dict()
    del d[key]
    with pytest.raises(IntegrityError) as info:
        RunMeta.from_dict(d, source=tmp_path / "meta.json")
    assert info.value.field == key


def test_run_meta_bad_classes_and_bad_files(tmp_path):
    with pytest.raises(IntegrityError):
        RunMeta.from_dict({**_meta().to_dict(), "classes": []})
    with pytest.raises(IntegrityError):
        RunMeta.from_dict({**_meta().to_dict(), "classes": ["ok", 3]})
    broken = tmp_path / "broken.json"
    broken.write_text('{"classes": [')
    with pytest.raises(IntegrityError):
        RunMeta.load(broken)
    with pytest.raises(UsageError) as info:
        RunMeta.load(tmp_path / "absent" / "meta.json")
    assert not isinstance(info.value, IntegrityError)
    assert "absent" in str(info.value)
