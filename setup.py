"""Packages, and where the profiles go: target profiles and calibration presets live in the checkout's
top-level `targets/` and `calibration/` (where people read and edit them); a wheel carries them as
`edgetransfer/profiles/targets/` and `edgetransfer/profiles/calibration/`. Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

PROFILES = {"edgetransfer.profiles.targets": "targets", "edgetransfer.profiles.calibration": "calibration"}

setup(packages=find_packages(include=["edgetransfer*"]) + list(PROFILES), package_dir=PROFILES)
