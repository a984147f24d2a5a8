"""Random bytes into every reader of files that arrive from elsewhere: the bundle manifest, target
profiles and calibration presets (YAML), safetensors checkpoints and torch weight files. Only the
toolkit's own typed errors may come out — never a crash, a hang or another exception type."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetransfer.backbones import read_state_dict
from edgetransfer.bundle import read_manifest
from edgetransfer.errors import EdgeTransferError
from edgetransfer.targets import load_calibration, load_target
from edgetransfer.tensorfile import read_safetensors

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _only_typed_errors(read, path: Path) -> None:
    try:
        read(path)
    except EdgeTransferError:
        pass


@FUZZ
@given(data=st.binary(max_size=4096))
def test_manifest_reader_on_random_bytes(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("bundle")
    (folder / "manifest.json").write_bytes(data)
    _only_typed_errors(read_manifest, folder)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                           max_leaves=20)


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(["schema", "manifest_sha256", "files", "target", "classes", "input",
                                            "artifact", "golden", "backend"]) | st.text(max_size=10), json_values,
                           max_size=9))
def test_manifest_reader_on_random_json(tmp_path_factory, doc):
    folder = tmp_path_factory.mktemp("bundle")
    (folder / "manifest.json").write_text(json.dumps(doc))
    _only_typed_errors(read_manifest, folder)


@FUZZ
@given(data=st.binary(max_size=2048) | st.text(max_size=2048).map(str.encode))
def test_target_and_calibration_loaders_on_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("yaml") / "profile.yaml"
    path.write_bytes(data)
    _only_typed_errors(load_target, path)
    _only_typed_errors(load_calibration, path)


yaml_docs = st.dictionaries(st.sampled_from(["name", "backend", "device", "precision", "batch", "quantization",
                                             "gates", "tensorrt", "threads", "method", "samples"]),
                            json_values, max_size=8)


@FUZZ
@given(doc=yaml_docs)
def test_target_loader_on_random_structures(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("yaml") / "profile.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML: random keys and values of every type
    _only_typed_errors(load_target, path)
    _only_typed_errors(load_calibration, path)


@FUZZ
@given(header=st.binary(max_size=512), size=st.integers(min_value=0, max_value=2**64 - 1), tail=st.binary(max_size=256))
def test_checkpoint_loader_on_random_safetensors(tmp_path_factory, header, size, tail):
    folder = tmp_path_factory.mktemp("ckpt")
    raw = folder / "random.safetensors"
    raw.write_bytes(struct.pack("<Q", size) + header + tail)
    _only_typed_errors(read_safetensors, raw)
    sized = folder / "sized.safetensors"  # a header size that matches, so the JSON parser sees the bytes
    sized.write_bytes(struct.pack("<Q", len(header)) + header + tail)
    _only_typed_errors(read_safetensors, sized)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_torch_weights_loader_on_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("pth") / "weights.pth"
    path.write_bytes(data)
    _only_typed_errors(read_state_dict, path)
