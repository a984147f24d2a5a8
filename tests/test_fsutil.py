"""Atomic writes: the final name appears only complete, a failed write leaves the old file, and the
file gets the mode any other file would (not the temporary file's private 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from edgetransfer.fsutil import atomic_path, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_written_files_get_the_umask_mode(tmp_path):
    umask = os.umask(0o027)
    os.umask(umask)
    path = write_text(tmp_path / "b.txt", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
