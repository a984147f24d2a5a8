"""An installed wheel carries every profile: the checkout keeps target profiles and calibration presets in
top-level `targets/` and `calibration/`, setup.py maps them into the package, and a user who ran
`pip install edgetransfer-*.whl` (not an editable install of this checkout) must see the same names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the wheel is built from the tracked files only)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Build a wheel from a clean copy of the tracked files and install it (no dependencies) into a folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in _tracked_files():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("edgetransfer-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return wheel, site


def _run_installed(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH comes before the editable install's finder, so `edgetransfer` is the installed wheel's
    env = {**os.environ, "PYTHONPATH": str(site), "EDGETRANSFER_PROGRESS": "0", "COLUMNS": "250"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_maps_the_top_level_profiles_into_the_package(installed_wheel):
    wheel, _ = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("targets", "calibration"):
        for path in sorted((ROOT / kind).glob("*.yaml")):
            assert f"edgetransfer/profiles/{kind}/{path.name}" in names
    assert not any(n.startswith(("targets/", "calibration/")) for n in names), "profiles must not land top-level"
    for path in sorted((ROOT / "edgetransfer/backends/tensorrt").glob("onnx-ops-*.yaml")):
        assert f"edgetransfer/backends/tensorrt/{path.name}" in names


def test_an_installed_wheel_lists_every_profile_and_preset(installed_wheel, tmp_path):
    _, site = installed_wheel
    where = _run_installed(site, "-c", "import edgetransfer; print(edgetransfer.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(site), "the test must run the wheel, not the checkout"

    shown = _run_installed(site, "-m", "edgetransfer", "targets", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    expected = sorted(p.stem for p in (ROOT / "targets").glob("*.yaml"))
    assert len(expected) >= 5
    for name in expected:
        assert name in shown.stdout, f"{name} missing from `edgetransfer targets` of the installed wheel"

    code = ("from edgetransfer.targets import list_calibration_presets, load_target;"
            "from edgetransfer.backends.tensorrt.ops import table_majors, operator_table;"
            "print(list_calibration_presets()); print(table_majors());"
            "print(load_target('jetson-orin-nano').tensorrt.tensorrt, len(operator_table(10).supported))")
    loaded = _run_installed(site, "-c", code, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    presets, majors, trt = loaded.stdout.strip().splitlines()
    assert presets == str(sorted(p.stem for p in (ROOT / "calibration").glob("*.yaml")))
    assert majors == str(sorted(int(p.stem.removeprefix("onnx-ops-"))
                                for p in (ROOT / "edgetransfer/backends/tensorrt").glob("onnx-ops-*.yaml")))
    assert int(trt.split()[-1]) > 50
