"""The bundle format: what the workstation's writer and the device runtime both stand on.

A bundle folder holds `manifest.json` (canonical JSON carrying its own sha256 and the sha256 of every
other file), `model/` (the backend's artifact files, or TensorRT's build kit) and `golden/` (held-out
inputs and the outputs the artifact gave at bundle time, as .npy, never pickles). This module reads
and checks all of it, opens archives safely and verifies a bundle on the device; it imports no torch
and nothing of the workstation (`bundle.py`, the writer, imports it, never the other way round).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DependencyError, EdgeTransferError, IntegrityError, UsageError
from .fsutil import sha256_file
from .parity import PairReport, Side, compare
from .spec import InputSpec

log = logging.getLogger(__name__)

SCHEMA = 1
KIND = "edgetransfer-bundle"
#: a manifest lists files and golden images: kilobytes; far more is not one edgetransfer wrote
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MANIFEST = "manifest.json"
MODEL_DIR = "model"
GOLDEN_DIR = "golden"

#: archive bounds: a bundle is a model plus a few dozen inputs, never gigabytes of small files
MAX_MEMBERS = 1000
MAX_BYTES = 2 * 1024**3

_REQUIRED = ("schema", "kind", "target", "backend", "precision", "artifact", "classes", "input_spec", "files",
             "golden", "manifest_sha256")
_DRIVE = re.compile(r"^[A-Za-z]:")


# ---- manifest --------------------------------------------------------------------------------

def _canonical(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in body.items() if k != "manifest_sha256"})).hexdigest()


def manifest_bytes(body: dict[str, Any]) -> bytes:
    """The manifest file's exact bytes: canonical JSON that includes the digest of the rest."""
    return _canonical({**body, "manifest_sha256": _digest(body)})


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Parse and check `folder/manifest.json`: canonical form, self-digest, schema, required keys.

    Exit 4 (IntegrityError) for anything that was not written by `write_bundle` as it is now,
    including a manifest from a newer schema than this edgetransfer reads.
    """
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise UsageError("no such bundle folder or archive", path=folder)
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise IntegrityError("no manifest.json: not an edgetransfer bundle", path=folder) from exc
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever
        raise IntegrityError("not a regular file", path=path)
    if info.st_size > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{info.st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}", path=path)
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"not valid JSON ({exc})", path=path) from exc
    except RecursionError as exc:
        raise IntegrityError("not a manifest: nested too deep to parse", path=path) from exc
    if not isinstance(data, dict):
        raise IntegrityError("expected a JSON object", path=path)
    schema = data.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise IntegrityError(f"schema must be a positive integer, got {schema!r}", path=path, field="schema")
    if schema > SCHEMA:
        raise IntegrityError(f"bundle schema {schema} is newer than this edgetransfer reads ({SCHEMA}); "
                             "upgrade edgetransfer on the device", path=path, field="schema")
    if data.get("kind") != KIND:
        raise IntegrityError(f"kind is {data.get('kind')!r}, expected {KIND!r}", path=path, field="kind")
    for key in _REQUIRED:
        if key not in data:
            raise IntegrityError("missing required key", path=path, field=key)
    if _canonical(data) != raw:
        raise IntegrityError("not in the canonical form edgetransfer writes: edited after bundling", path=path)
    if _digest(data) != data["manifest_sha256"]:
        raise IntegrityError("manifest content does not match its manifest_sha256: edited after bundling",
                             path=path, field="manifest_sha256")
    files = data["files"]
    if not isinstance(files, dict) or not files:
        raise IntegrityError("must map file names to their sha256", path=path, field="files")
    for name, entry in files.items():
        if (reason := unsafe_name(name)) is not None:
            raise IntegrityError(f"file name {name!r}: {reason}", path=path, field="files")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
            raise IntegrityError(f"entry for {name!r} needs sha256 and bytes", path=path, field="files")
    artifact, golden = data["artifact"], data["golden"]
    named = {"artifact.path": [artifact.get("path")], "artifact.files": artifact.get("files") or [None],
             "golden": [golden.get(k) for k in ("inputs", "expected")]}
    for where, names in named.items():  # everything the runtime opens is a file whose hash is checked
        for name in names:
            if name not in files:
                raise IntegrityError(f"{name!r} is not one of the bundle's hashed files", path=path, field=where)
    return data


def unsafe_name(name: str) -> str | None:
    """Why `name` cannot be a path inside a bundle (None if it can): relative POSIX names only."""
    if not isinstance(name, str) or not name:
        return "empty name"
    if "\x00" in name or "\\" in name:
        return "NUL or backslash in the name"
    if name.startswith("/") or _DRIVE.match(name):
        return "absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "'..', '.' or empty path component"
    if len(name.encode("utf-8")) > 1024 or any(len(part.encode("utf-8")) > 255 for part in name.split("/")):
        return "name too long (255 bytes per component, 1024 in all)"
    return None


def check_files(folder: str | Path, manifest: dict[str, Any], names: list[str] | None = None) -> int:
    """Compare the folder's files with the manifest (no extra, none missing) and check each sha256.

    With `names`, hash only those (the runtime checks what it loads; `verify` checks everything).
    Returns the number of bytes hashed. Exit 4 naming the first file that does not match.
    """
    folder = Path(folder)
    expected = set(manifest["files"]) | {MANIFEST}
    present: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise IntegrityError("not a regular file (link, device or fifo) inside the bundle", path=path)
            if path.is_file():
                present.add(rel)
    if extra := sorted(present - expected):
        raise IntegrityError(f"files not listed in the manifest: {', '.join(extra)}", path=folder / MANIFEST)
    if missing := sorted(expected - present):
        raise IntegrityError(f"files listed in the manifest are missing: {', '.join(missing)}", path=folder)
    hashed = 0
    for name in sorted(manifest["files"]) if names is None else names:
        entry = manifest["files"][name]
        path = folder / name
        size = path.stat().st_size
        if size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise IntegrityError(f"sha256 does not match the manifest ({size} bytes, manifest says "
                                 f"{entry['bytes']}): tampered with or corrupted", path=path)
        hashed += size
    return hashed


# ---- archives --------------------------------------------------------------------------------

def _check_members(members: list[tarfile.TarInfo], archive: Path, max_members: int, max_bytes: int) -> None:
    seen: set[str] = set()
    total = 0
    for m in members:
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            kind = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.DIRTYPE: "directory",
                    tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                    tarfile.FIFOTYPE: "fifo"}.get(m.type, f"type {m.type!r}")
            raise IntegrityError(f"member {m.name!r} is a {kind}; bundle archives hold regular files only",
                                 path=archive)
        if (reason := unsafe_name(m.name)) is not None:
            raise IntegrityError(f"member {m.name!r}: {reason}", path=archive)
        key = m.name.casefold()
        if key in seen:
            raise IntegrityError(f"member {m.name!r} appears twice", path=archive)
        seen.add(key)
    if len(members) > max_members:
        raise IntegrityError(f"{len(members)} members; this archive may hold at most {max_members}", path=archive)
    for m in members:
        total += m.size
        if total > max_bytes:
            raise IntegrityError(f"members add up to more than {max_bytes} bytes", path=archive)


def _listed_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], archive: Path) -> list[tarfile.TarInfo]:
    """The members a bundle archive may extract: each must be listed in its manifest with the size the
    manifest declares, so nothing beyond what the bundle says it holds reaches the disk (a camera box
    may have little to spare). A manifest that cannot be read is extracted alone: `read_manifest`
    then says exactly why it is refused."""
    manifest = next((m for m in members if m.name == MANIFEST), None)
    if manifest is None:
        raise IntegrityError(f"no {MANIFEST} in the archive: not an edgetransfer bundle", path=archive)
    if manifest.size > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{MANIFEST} is {manifest.size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}",
                             path=archive)
    try:
        files = json.loads(tar.extractfile(manifest).read().decode("ascii"))["files"]
        declared = {name: entry["bytes"] for name, entry in files.items()}
    except (ValueError, AttributeError, TypeError, KeyError, RecursionError):
        return [manifest]
    for m in members:
        if m is manifest:
            continue
        if m.name not in declared:
            raise IntegrityError(f"member {m.name!r} is not listed in the bundle's {MANIFEST}", path=archive)
        if m.size != declared[m.name]:
            raise IntegrityError(f"member {m.name!r} holds {m.size} bytes, the manifest declares {declared[m.name]}",
                                 path=archive)
    return members


def _gzip_bytes(archive: Path, max_bytes: int) -> int:
    """Decompress the whole stream once, counting real bytes, so a gzip bomb stops at the bound."""
    total = 0
    try:
        with gzip.open(archive, "rb") as fh:
            while block := fh.read(1 << 20):
                total += len(block)
                if total > max_bytes + (1 << 20):  # tar headers and padding on top of the members
                    raise IntegrityError(f"decompresses to more than {max_bytes} bytes", path=archive)
    except (OSError, EOFError, zlib.error) as exc:
        raise IntegrityError(f"not a readable gzip-compressed tar archive ({exc})", path=archive) from exc
    return total


def extract_archive(archive: str | Path, dest: str | Path, *, max_members: int = MAX_MEMBERS,
                    max_bytes: int = MAX_BYTES, require_manifest: bool = False) -> Path:
    """Extract a bundle archive into `dest` (which must not exist) and return it.

    `require_manifest`: only the members the archive's own manifest lists, at the sizes it declares,
    are extracted (how `verify`, `infer` and `bench` open an archive; `_listed_members`).

    Every member is checked before a byte is written: regular files only (no links, devices, fifos
    or directories), relative names without '..', duplicates or drive letters, a bounded member
    count and size, and a bounded decompressed size counted on the real stream. Extraction then
    uses tarfile's "data" filter as a second line, into a temporary sibling renamed into place.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise UsageError("no such bundle archive", path=archive)
    if dest.exists():
        raise UsageError("destination exists; extract into a new folder", path=dest)
    _gzip_bytes(archive, max_bytes)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            _check_members(members, archive, max_members, max_bytes)
            if require_manifest:
                members = _listed_members(tar, members, archive)
            tar.extractall(tmp, members=members, filter="data")
        os.replace(tmp, dest)
    except tarfile.TarError as exc:
        raise IntegrityError(f"unreadable or unsafe tar archive ({exc})", path=archive) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextlib.contextmanager
def bundle_folder(path: str | Path) -> Iterator[Path]:
    """A bundle folder for `path`: the folder itself, or an archive safely extracted to a temporary one."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.exists():
        raise UsageError("no such bundle folder or archive", path=path)
    with tempfile.TemporaryDirectory(prefix="edgetransfer-bundle-") as tmp:
        folder = Path(tmp) / "bundle"
        try:
            yield extract_archive(path, folder, require_manifest=True)
        except EdgeTransferError as exc:  # name the archive the user gave, not the temporary folder
            inside = f"{folder}{os.sep}"
            exc.args = tuple(a.replace(inside, f"{path}:").replace(str(folder), str(path)) if isinstance(a, str)
                             else a for a in exc.args)
            if exc.path is not None and exc.path.is_relative_to(folder):
                exc.path = Path(f"{path}:{exc.path.relative_to(folder).as_posix()}")
            raise


# ---- golden set ------------------------------------------------------------------------------

def load_array(path: Path) -> np.ndarray:
    """A .npy file, never a pickle."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise IntegrityError(f"not a plain .npy array ({exc})", path=path) from exc


def run_batches(runner: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """Logits for `x` in chunks of `batch`: the same chunks at bundle time and at verify time."""
    return np.concatenate([runner.infer(x[i:i + batch]) for i in range(0, len(x), batch)])


def build_target(manifest: dict[str, Any]) -> Any:
    """The target profile the bundle was made for, from the copy in its manifest."""
    from .schema import from_dict
    from .targets import Target

    return from_dict(Target, manifest["target"], source=MANIFEST)


def ran_precision(runner: Any, manifest: dict[str, Any]) -> str:
    """What the runner says it ran; where it cannot tell here (no `onnx` package on the device), what
    the same artifact ran as at bundle time."""
    if runner.precision.startswith("unknown") and manifest.get("ran_as"):
        return f"{manifest['ran_as']} (as at bundle time)"
    return runner.precision


def kit_instructions(manifest: dict[str, Any]) -> str:
    kit = manifest["artifact"]
    return (f"no engine in this bundle (a {kit.get('backend_label', manifest['backend'])} build kit); build it on "
            f"the device with `{kit.get('build_command', 'see model/BUILD_ON_DEVICE.md')}`")


@dataclass
class VerifyResult:
    bundle: Path
    manifest: dict[str, Any]
    files: int
    bytes_hashed: int
    golden: PairReport | None = None
    notes: list[str] = field(default_factory=list)
    #: the bundle records a parity failure at bundle time and verify was not told to accept it
    failed_parity: bool = False

    @property
    def passed(self) -> bool:
        """Every check that ran passed (with `hashes_only`, the golden set did not run), and the bundle
        does not carry a failed parity the caller did not accept."""
        return not self.failed_parity and (self.golden is None or self.golden.passed)


def verify_bundle(path: str | Path, *, expect: str | None = None, hashes_only: bool = False,
                  allow_failed: bool = False) -> VerifyResult:
    """Check every file's sha256, then run the golden set on this device's backend.

    A bundle shipped with `--allow-failed` (its parity failed at bundle time) does not pass unless
    the device side says `allow_failed` too: a script that checks exit codes must not accept it.

    Exit codes through the raised errors: 4 for a file that does not match (or an unsafe archive),
    3 when the backend is absent here or the bundle holds a build kit instead of an engine. Golden
    outputs beyond the target's compiler tolerances are returned (`passed` false): the CLI exits 1.
    """
    with bundle_folder(path) as folder:
        manifest = read_manifest(folder)
        if expect is not None and expect != manifest["manifest_sha256"]:
            raise IntegrityError(f"bundle digest {manifest['manifest_sha256']} is not the expected {expect}",
                                 path=Path(folder) / MANIFEST, field="manifest_sha256")
        hashed = check_files(folder, manifest)
        result = VerifyResult(bundle=Path(path), manifest=manifest, files=len(manifest["files"]), bytes_hashed=hashed)
        parity = manifest.get("parity") or {}
        if parity.get("passed") is False:
            result.notes.append("shipped although parity FAILED at bundle time: " + "; ".join(parity.get("failures", []))
                                + ("" if allow_failed else " (exit 1; `verify --allow-failed` accepts it)"))
            result.failed_parity = not allow_failed
        if hashes_only:
            return result
        if manifest["artifact"]["kind"] != "compiled":
            raise DependencyError(f"all {result.files} files match their sha256; " + kit_instructions(manifest))
        result.golden = _check_golden(folder, manifest)
        return result


def compare_golden(task: str, pair: str, reference: Side, candidate: Side, ref: np.ndarray, got: np.ndarray,
                   labels: np.ndarray | None, gates: Any) -> Any:
    """The golden-set comparison: logits for a classifier, scores (`anomaly.parity`, numpy only) for an
    anomaly scorer; both reports have `passed`, `failures` and `agreement`."""
    if task == "anomaly":
        from .anomaly.parity import compare_scores

        return compare_scores(pair, reference, candidate, ref, got, None, gates)
    return compare(pair, reference, candidate, ref, got, labels, gates)


def _check_golden(folder: Path, manifest: dict[str, Any]) -> PairReport:
    from .backends import get_backend

    golden = manifest["golden"]
    spec = InputSpec.from_dict(manifest["input_spec"], source=MANIFEST)
    x = load_array(folder / golden["inputs"])
    expected = load_array(folder / golden["expected"])
    labels = load_array(folder / golden["labels"]) if golden.get("labels") else None
    want = (len(x), 3, spec.height, spec.width)
    if x.shape != want or x.dtype != np.float32:
        raise IntegrityError(f"golden inputs are {x.dtype}{list(x.shape)}, expected float32{list(want)}",
                             path=folder / golden["inputs"])
    target = build_target(manifest)
    backend = get_backend(manifest["backend"])
    with backend.load(folder / manifest["artifact"]["path"], target) as runner:
        got = run_batches(runner, x, int(golden["batch"]))
        here = Side(f"{runner.description} on this device", ran_precision(runner, manifest))
    gates = target.gates.compiler.gates()
    return compare_golden(manifest.get("task", "classification"), "golden set: bundle time vs this device",
                          Side(golden["expected_from"], manifest.get("ran_as") or manifest["precision"]),
                          here, expected, got, labels, gates)
