"""ONNX files that came from someone else: parsed first in a child process, external data confined.

Run folders are copied between people and machines. ONNX parsing happens in native code (protobuf,
the runtimes' loaders), where a malformed file can crash the process instead of raising — so a file
is first parsed in a short-lived child process: a crash there is exit 4 naming the file, not a dead
CLI. The same probe lists the tensors stored as external data; each location must be a plain
relative path inside the model's folder (no absolute paths, no `..`, no links), or the file is
refused before any runtime follows it.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .errors import IntegrityError

#: runs in the child: parse without external data, print each external location
_PROBE = """
import json, sys
import onnx

def tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from tensors(sub)

m = onnx.load(sys.argv[1], load_external_data=False)
external = sorted({e.value for t in tensors(m.graph) if t.data_location == onnx.TensorProto.EXTERNAL
                   for e in t.external_data if e.key == "location"})
print(json.dumps({"nodes": len(m.graph.node), "external": external}))
"""
PROBE_TIMEOUT_S = 120


def check_onnx_file(path: str | Path) -> None:
    """Exit 4 for a file that is empty, not ONNX, crashes the parser, or points outside its folder."""
    path = Path(path)
    stat = path.stat()
    if stat.st_size == 0:
        raise IntegrityError("empty ONNX file (0 bytes)", path=path)
    _probe(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _probe(path: str, mtime_ns: int, size: int) -> None:
    """Cached per file version: the stages check the same model several times in one command."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired as exc:
        raise IntegrityError(f"parsing did not finish within {PROBE_TIMEOUT_S} s", path=path) from exc
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise IntegrityError(f"the ONNX parser crashed on this file ({name}); refusing it", path=path)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise IntegrityError(f"not a readable ONNX model ({last})", path=path)
    _check_external(Path(path), json.loads(proc.stdout.strip().splitlines()[-1])["external"])


def _check_external(path: Path, locations: list[str]) -> None:
    folder = path.parent.resolve()
    for location in locations:
        where = Path(location)
        if where.is_absolute() or ".." in where.parts or location.startswith(("/", "\\")) or ":" in location:
            raise IntegrityError(f"external data location {location!r} leaves the model's folder", path=path)
        target = step = folder / where
        while step != folder:
            if step.is_symlink():
                raise IntegrityError(f"external data location {location!r} goes through a link; refused", path=path)
            step = step.parent
        if folder not in target.resolve().parents:
            raise IntegrityError(f"external data location {location!r} resolves outside the model's folder", path=path)
        if not target.is_file():
            raise IntegrityError(f"external data file {location!r} is missing", path=path)
