"""Weights from other people: malformed safetensors and NaN weights (the pickle that would run code
is tests/test_backbones.py::test_pickle_with_code_is_refused_and_never_runs). Each is a real file
built here; each must be refused with exit 4 naming the file, before anything is allocated."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edgetransfer.backbones import read_state_dict
from edgetransfer.errors import IntegrityError
from edgetransfer.tensorfile import read_safetensors, safetensors_header


def _write(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("name, header, data, message", [
    ("absurd_header", None, b"", "header claims"),
    ("past_end", {"w": {**F32, "data_offsets": [0, 4096]}}, b"\0" * 8, "outside the 8-byte data section"),
    ("overlap", {"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ("wrong_size", {"w": {**F32, "shape": [3]}}, b"\0" * 8, "cannot hold F32 [3]"),
    ("bad_dtype", {"w": {**F32, "dtype": "PYOBJ"}}, b"\0" * 8, "unknown dtype"),
    ("negative_shape", {"w": {**F32, "shape": [-2]}}, b"\0" * 8, "non-negative integers"),
])
def test_malformed_safetensors_are_refused_from_the_header(tmp_path, name, header, data, message):
    path = tmp_path / f"{name}.safetensors"
    if header is None:  # claims a 2**62-byte header in a 16-byte file: must not try to read or allocate it
        path.write_bytes(struct.pack("<Q", 2**62) + b"{}" + b"\0" * 6)
    else:
        _write(path, header, data)
    with pytest.raises(IntegrityError) as info:
        read_safetensors(path)
    assert info.value.exit_code == 4 and message in str(info.value) and str(path) in str(info.value)


def test_duplicate_tensor_names_are_refused(tmp_path):
    raw = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(IntegrityError, match="duplicate tensor names in the safetensors header: w"):
        safetensors_header(path)


def test_truncated_and_empty_files_are_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path in (cut, empty):
        with pytest.raises(IntegrityError) as info:
            read_safetensors(path)
        assert str(path) in str(info.value)
    assert torch.equal(read_safetensors(good)["w"], torch.ones(64, 64))


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    weights = {"layer.weight": torch.ones(3), "layer.bias": torch.tensor([0.0, float("nan")])}
    st = tmp_path / "nan.safetensors"
    save_file(weights, str(st))
    with pytest.raises(IntegrityError, match="non-finite weights .* in layer.bias"):
        read_safetensors(st)
    pth = tmp_path / "inf.pth"
    torch.save({"w": torch.tensor([np.inf])}, pth)
    with pytest.raises(IntegrityError, match="non-finite weights"):
        read_state_dict(pth)
