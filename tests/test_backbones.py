"""backbones.py: the registry, head replacement per family, and every way weights are read.

Nothing is mocked: models are built by torchvision, weights files are real files on disk, and the
"offline" case is an empty TORCH_HOME with the network switched off for the test.
"""

from __future__ import annotations

import os
import shlex
import socket
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from edgetransfer.backbones import create, list_backbones
from edgetransfer.cli import main
from edgetransfer.errors import IntegrityError, UsageError


def _fresh_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A torchvision model's state dict, built independently of edgetransfer, with known values."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_body_loaded(model: nn.Module, state: dict[str, torch.Tensor], head_prefix: str) -> None:
    own = model.state_dict()
    body = [k for k in state if not k.startswith(head_prefix)]
    assert body, "nothing to compare"
    for k in body:
        assert torch.equal(own[k], state[k]), f"{k} was not loaded from the weights file"


@pytest.fixture
def offline(monkeypatch):
    """No network for this test: a download attempt fails as it would on an air-gapped machine."""
    def refuse(*_args, **_kwargs):
        raise OSError("network disabled for this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_registry_lists_the_common_families():
    names = list_backbones(include_timm=False)
    for name in ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                 "convnext_tiny", "regnet_y_400mf", "squeezenet1_1", "swin_t", "vit_b_16"):
        assert name in names
    # families whose training forward returns auxiliary outputs are left out, not half-supported
    assert "googlenet" not in names and "inception_v3" not in names
    with pytest.raises(UsageError) as info:
        create("googlenet", 3)
    assert info.value.field == "backbone"
    with pytest.raises(UsageError) as info:
        create("resnet19", 3)
    assert "resnet19" in str(info.value)
    with pytest.raises(UsageError):
        create("resnet18", 1)


@pytest.mark.parametrize("name, size, head, head_type", [
    ("resnet18", 32, "fc", nn.Linear),
    ("resnet50", 32, "fc", nn.Linear),
    ("mobilenet_v3_small", 32, "classifier.3", nn.Linear),
    ("mobilenet_v3_large", 32, "classifier.3", nn.Linear),
    ("efficientnet_b0", 32, "classifier.1", nn.Linear),
    ("convnext_tiny", 32, "classifier.2", nn.Linear),
    ("regnet_y_400mf", 32, "fc", nn.Linear),
    ("squeezenet1_1", 64, "classifier", nn.Sequential),  # a 1x1 conv head, flattened after
    ("swin_t", 64, "head", nn.Linear),                     # a transformer (vit_b_16 needs 224 px: too slow here)
])
def test_head_replacement_gives_the_new_width(name, size, head, head_type):
    bb = create(name, 3, weights="none", img_size=size)
    assert bb.head.path == head
    module = bb.model.get_submodule(head)
    assert isinstance(module, head_type)
    if isinstance(module, nn.Linear):
        assert module.out_features == 3
    else:
        convs = [m for m in module if isinstance(m, nn.Conv2d)]
        assert convs[-1].out_channels == 3 and bb.head.flatten
    bb.model.eval()
    with torch.no_grad():
        out = bb.model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3)  # also proves the new head's input width fits the backbone
    assert (bb.input_spec.height, bb.input_spec.width) == (size, size)
    assert bb.weights == "none" and bb.source_classes is None


def test_default_weights_missing_offline_names_the_exact_file(torch_home, offline):
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    expected = torch_home / "hub" / "checkpoints" / os.path.basename(urlparse(url).path)
    with pytest.raises(UsageError) as info:
        create("resnet18", 3, weights="default", img_size=32)
    assert info.value.exit_code == 2
    assert str(expected) in str(info.value)
    assert info.value.field == "weights"
    assert not expected.exists()  # nothing half-downloaded under the final name


def test_default_weights_missing_offline_cli_exit_2(torch_home, offline, tiny_data, tmp_path):
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    expected = torch_home / "hub" / "checkpoints" / os.path.basename(urlparse(url).path)
    result = CliRunner().invoke(main, ["train", str(tiny_data), "--backbone", "resnet18", "--weights", "default", "--img-size", "32",
                                       "--epochs", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert str(expected) in result.output
    assert "Traceback" not in result.output


def test_default_weights_in_the_hub_cache_are_loaded(torch_home, offline):
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    target = torch_home / "hub" / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    target.parent.mkdir(parents=True)
    state = _fresh_state("resnet18", seed=1234)
    torch.save(state, target)
    bb = create("resnet18", 3, weights="default", img_size=32)
    _assert_body_loaded(bb.model, state, "fc.")
    assert bb.model.fc.out_features == 3
    assert bb.weights == "ResNet18_Weights.IMAGENET1K_V1"
    # the weights' own normalisation travels with them
    assert bb.input_spec.mean == tuple(weights.transforms().mean)
    assert bb.input_spec.std == tuple(weights.transforms().std)
    assert bb.input_spec.height == 32
    # and a model built without weights really differs (the comparison above can fail)
    assert not torch.equal(create("resnet18", 3, weights="none", img_size=32).model.conv1.weight,
                           state["conv1.weight"])


def test_weight_keywords_win_over_same_named_folders(tmp_path, monkeypatch, torch_home, offline):
    """`--weights none|default` mean the keyword even where the cwd holds a run folder called so."""
    monkeypatch.chdir(tmp_path)
    for name in ("none", "default"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text("{}")  # would be an IntegrityError if read
    bb = create("resnet18", 3, weights="none", img_size=32)
    assert bb.weights == "none"
    with pytest.raises(UsageError) as info:  # the hub cache is asked (and is empty), not ./default
        create("resnet18", 3, weights="default", img_size=32)
    assert str(torch_home / "hub" / "checkpoints") in str(info.value)
    # a folder of that name is still reachable as a path
    with pytest.raises(IntegrityError):
        create("resnet18", 3, weights="./default", img_size=32)


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(UsageError) as info:
        create("resnet18", 3, weights="IMAGENET9K_V7")
    assert "IMAGENET1K_V1" in str(info.value) and info.value.field == "weights"


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-wrapped"])
def test_local_weights_file_is_loaded(tmp_path, fmt):
    state = _fresh_state("resnet18", seed=7)
    if fmt == "safetensors":
        path = tmp_path / "r18.safetensors"
        save_file(state, str(path))
    elif fmt == "pth":
        path = tmp_path / "r18.pth"
        torch.save(state, path)
    else:  # what DataParallel training scripts save: {"state_dict": {"module.<key>": ...}}
        path = tmp_path / "r18_wrapped.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    bb = create("resnet18", 4, weights=str(path), img_size=32)
    _assert_body_loaded(bb.model, state, "fc.")
    assert bb.model.fc.out_features == 4  # the 1000-class head of the file is not forced in
    assert bb.weights == str(path)


def test_weights_of_another_architecture_list_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "mnv3.safetensors"
    save_file(_fresh_state("mobilenet_v3_small", seed=0), str(path))
    with pytest.raises(UsageError) as info:
        create("resnet18", 3, weights=str(path), img_size=32)
    msg = str(info.value)
    assert info.value.exit_code == 2 and info.value.field == "weights"
    assert "missing" in msg and "unexpected" in msg
    assert "bn1.bias" in msg                  # a resnet18 key the file lacks
    assert "features.0.0.weight" in msg       # a mobilenet key resnet18 does not have
    assert str(path) in msg


def test_weights_with_a_wrong_shape_are_refused(tmp_path):
    state = _fresh_state("resnet18", seed=0)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(UsageError) as info:
        create("resnet18", 3, weights=str(path), img_size=32)
    assert "wrong shape" in str(info.value) and "conv1.weight" in str(info.value)


def test_missing_weights_file_is_usage_error(tmp_path):
    with pytest.raises(UsageError) as info:
        create("resnet18", 3, weights=str(tmp_path / "nope.safetensors"))
    assert "nope.safetensors" in str(info.value)


def test_weights_from_a_run_folder_bring_their_classes_and_normalisation(trained_run):
    from safetensors.torch import load_file

    run = trained_run.run
    bb = create("resnet18", 2, weights=str(run), img_size=48)
    assert bb.source_classes == trained_run.meta.classes
    assert bb.model.fc.out_features == 2
    _assert_body_loaded(bb.model, load_file(str(run / "model.safetensors")), "fc.")
    assert bb.input_spec.mean == trained_run.meta.input_spec.mean
    assert (bb.input_spec.height, bb.input_spec.width) == (48, 48)
    # same class count: the trained head is kept too
    same = create("resnet18", len(trained_run.meta.classes), weights=str(run), img_size=32)
    assert torch.equal(same.model.fc.weight, load_file(str(run / "model.safetensors"))["fc.weight"])
    with pytest.raises(UsageError) as info:
        create("resnet34", 2, weights=str(run))
    assert info.value.field == "backbone" and "resnet18" in str(info.value)


class _Payload:
    """Unpickling this runs a shell command: what a booby-trapped checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, tiny_data):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _Payload(marker), "conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(IntegrityError) as info:
        create("resnet18", 3, weights=str(path), img_size=32)
    assert info.value.exit_code == 4 and str(path) in str(info.value)
    assert not marker.exists()
    # the CLI refuses it with exit code 4, before any training
    result = CliRunner().invoke(main, ["train", str(tiny_data), "--weights", str(path), "--img-size", "32",
                                       "--epochs", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 4, result.output
    assert str(path) in result.output
    assert not marker.exists()
    # the payload is real: an unsafe load does run it, so the refusals above were what protected us
    torch.load(path, weights_only=False)
    assert marker.exists(), "the test payload is inert, so the refusal above proved nothing"
