"""NNCF and OpenVINO's converter send usage telemetry by default; edgetransfer's calls to them must not.

Checked in a child process: NNCF turns its telemetry into a stub whenever pytest is imported, so only a
process without pytest shows what a user's `edgetransfer quantize` / `compile` would do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

_CHILD = r"""
import json, os, sys
from pathlib import Path
from edgetransfer.stages import compile_run, quantize_run

run = Path(sys.argv[1])
quantize_run(run, "intel-cpu", calib="quick", max_fallback_layers=0)
compile_run(run, "intel-cpu", allow_failed=True)
import openvino_telemetry
from nncf.telemetry import wrapper
print(json.dumps({"nncf_stub": isinstance(wrapper.telemetry, wrapper.NNCFTelemetryStub), "openvino_consent": openvino_telemetry.Telemetry().consent,
                  "CI": os.environ.get("CI"), "NNCF_CI": os.environ.get("NNCF_CI")}))
"""


def test_quantize_and_compile_for_openvino_send_no_telemetry_and_leave_the_environment_as_it_was(exported_run,
                                                                                                   tmp_path):
    pytest.importorskip("nncf")
    pytest.importorskip("openvino_telemetry")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("meta.json", "model.safetensors", "model.onnx", "train_config.json", "split.json"):
        shutil.copy2(exported_run / name, run / name)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NNCF_CI", "NNCF_DEV", "PYTEST_CURRENT_TEST")}
    child = subprocess.run([sys.executable, "-c", _CHILD, str(run)], capture_output=True, text=True, timeout=600,
                           env={**env, "EDGETRANSFER_PROGRESS": "0"})
    assert child.returncode == 0, child.stderr
    state = json.loads(child.stdout.strip().splitlines()[-1])
    assert state["nncf_stub"] is True                 # NNCF was imported with its switch set
    assert state["openvino_consent"] is False         # the converter's telemetry declined
    assert state["CI"] is None and state["NNCF_CI"] is None  # and the switches did not outlive the calls
    assert (run / "intel-cpu" / "model.xml").is_file()
