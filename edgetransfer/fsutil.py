"""Atomic file writes: a reader never sees half a file under a final name.

Everything is written to a temporary sibling (same folder, so `os.replace` is an atomic rename on the
same filesystem), flushed and fsynced, then renamed over the final name.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@functools.cache
def _umask() -> int:
    """The process umask (os.umask can only be read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _owner() -> str:
    """This host's name as it appears in temporary names (a folder may be shared between machines)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _sweep_orphans(final: Path) -> None:
    """Remove temporaries of `final` left by a writer on this host that no longer runs (kill -9,
    power loss), so re-running a killed command needs no manual clean-up."""
    prefix = f".{final.name}.{_owner()}."
    for tmp in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        except PermissionError:  # alive, owned by someone else
            pass


def temporary_dir(final: str | Path) -> Path:
    """A new folder next to `final` named like every temporary here (host, pid), after sweeping the
    ones a killed writer left: for writers that assemble a whole folder, then rename it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_orphans(final)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{_owner()}.{os.getpid()}.", suffix=".tmp", dir=final.parent))


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it over `final` only if the block succeeds.

    For writers that insist on a file name of their own (torch.onnx, safetensors, openvino).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_orphans(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{_owner()}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; the final file gets the usual mode
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(final: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `final` for writing; it replaces `final` when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_open writes whole files: mode must be 'w' or 'wb'")
    with atomic_path(final) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as pretty, key-sorted JSON, atomically."""
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, allow_nan=False)
        fh.write("\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as fh:
        fh.write(text)
    return Path(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
