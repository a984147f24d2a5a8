"""Opening bundle archives never writes outside the destination: every hostile archive here is a real
tar file built in the test, and each is refused (exit 4) before a byte is extracted."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetransfer.bundle import extract_archive, read_manifest
from edgetransfer.cli import main
from edgetransfer.errors import IntegrityError


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"hello") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


HOSTILE = {
    "parent escape": ([_file("../evil.txt")], "'..'"),
    "nested escape": ([_file("model/../../evil.txt")], "'..'"),
    "absolute path": ([_file("/tmp/edgetransfer-evil.txt")], "absolute"),
    "drive letter": ([_file("C:/evil.txt")], "absolute"),
    "backslash": ([_file("model\\..\\..\\evil.txt")], "backslash"),
    "dot component": ([_file("./manifest.json")], "'.'"),
    "symlink": ([_special("model/link", tarfile.SYMTYPE, "/etc/passwd")], "symbolic link"),
    "hard link": ([_file("a.txt"), _special("b.txt", tarfile.LNKTYPE, "a.txt")], "hard link"),
    "character device": ([_special("dev", tarfile.CHRTYPE)], "character device"),
    "block device": ([_special("blk", tarfile.BLKTYPE)], "block device"),
    "fifo": ([_special("pipe", tarfile.FIFOTYPE)], "fifo"),
    "directory": ([_special("model", tarfile.DIRTYPE)], "directory"),
    "duplicate": ([_file("manifest.json", b"one"), _file("manifest.json", b"two")], "appears twice"),
    "duplicate by case": ([_file("Manifest.json"), _file("manifest.json")], "appears twice"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_before_extraction(case, tmp_path):
    members, reason = HOSTILE[case]
    # a harmless first member proves that nothing at all is extracted, not just the bad one
    archive = _tar(tmp_path / "hostile.tar.gz", [_file("first.txt"), *members])
    dest = tmp_path / "out" / "bundle"
    with pytest.raises(IntegrityError, match=reason) as info:
        extract_archive(archive, dest)
    assert info.value.exit_code == 4 and str(archive) in str(info.value)
    assert not dest.exists() and list((tmp_path / "out").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.tar.gz", "out"]


def test_bounds_on_members_size_and_decompression(tmp_path):
    many = _tar(tmp_path / "many.tar.gz", [_file(f"f{i}") for i in range(20)])
    with pytest.raises(IntegrityError, match="20 members"):
        extract_archive(many, tmp_path / "a", max_members=10)
    big = _tar(tmp_path / "big.tar.gz", [_file("a", b"x" * 3000), _file("b", b"y" * 3000)])
    with pytest.raises(IntegrityError, match="more than"):
        extract_archive(big, tmp_path / "b", max_bytes=5000)
    # a gzip bomb: 64 MiB of zeros compress to ~64 KiB; refused while decompressing, by real byte count
    bomb = tmp_path / "bomb.tar.gz"
    with gzip.open(bomb, "wb") as fh:
        fh.write(bytes(64 << 20))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(IntegrityError, match="decompresses to more than"):
        extract_archive(bomb, tmp_path / "c", max_bytes=8 << 20)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_broken_archives_are_refused(tmp_path):
    good = _tar(tmp_path / "good.tar.gz", [_file("a.txt", b"z" * 5000)])
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[:-40])
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        info, data = _file("a.txt")
        tar.addfile(info, io.BytesIO(data))
    for path in (truncated, plain):
        with pytest.raises(IntegrityError):
            extract_archive(path, tmp_path / "x")
        assert not (tmp_path / "x").exists()
    assert (extract_archive(good, tmp_path / "x") / "a.txt").read_bytes() == b"z" * 5000


def test_cli_refuses_a_hostile_archive_with_exit_4(bundles, tmp_path):
    manifest = (bundles["x86-onnxruntime"] / "manifest.json").read_bytes()
    archive = _tar(tmp_path / "b.tar.gz", [_file("manifest.json", manifest), _file("../../escaped.txt")])
    for command in (["verify", str(archive)], ["infer", str(archive), str(archive)], ["bench", str(archive)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 4, (command, result.output)
        assert "'..'" in result.output
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_a_real_bundle_archive_extracts_to_the_same_files(bundles, tmp_path):
    dest = extract_archive(bundles["x86-onnxruntime.tar.gz"], tmp_path / "b")
    assert read_manifest(dest) == read_manifest(bundles["x86-onnxruntime"])
    for path in bundles["x86-onnxruntime"].rglob("*"):
        if path.is_file():
            assert (dest / path.relative_to(bundles["x86-onnxruntime"])).read_bytes() == path.read_bytes()
