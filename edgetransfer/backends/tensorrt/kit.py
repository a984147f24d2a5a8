"""The on-device build kit: everything needed to build and verify the engine on the Jetson itself.

An engine is specific to the GPU model and TensorRT version that built it, so the place to build it
is the device. Where TensorRT is absent (every workstation without the device's JetPack), compile
writes into `RUN/<target>/`: the ONNX to build from, `build_engine.sh` (the exact trtexec command,
for C++/DeepStream deployments that never run Python), `BUILD_ON_DEVICE.md` (the edgetransfer
commands to compile and validate on the device), the preflight report, and `kit.json` recording
all of it with sha256s — then the CLI exits 3 saying where the kit is.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from ...fsutil import atomic_path, sha256_file, write_json, write_text
from ..base import KIT_FILE
from .plan import ENGINE_FILE, make_plan

SCRIPT_FILE = "build_engine.sh"
README_FILE = "BUILD_ON_DEVICE.md"
#: where JetPack installs trtexec (it is not on PATH by default)
JETSON_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"


def _target_arg(target: Any, out: Path) -> str:
    """How the device names the target: the profile name when it ships with edgetransfer, else the
    target.yaml the stage wrote next to the kit."""
    from ...targets import list_targets

    return target.name if target.name in list_targets() else f"RUN/{out.name}/target.yaml"


def write_build_kit(onnx: Path, target: Any, out: Path, *, reason: str, preflight: Any = None) -> Path:
    """Write the kit for building `onnx` for `target` into `out`; return its BUILD_ON_DEVICE.md."""
    onnx, out = Path(onnx), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if onnx.parent.resolve() != out.resolve():  # fp32/fp16 targets build from RUN/model.onnx
        with atomic_path(out / onnx.name) as tmp:
            shutil.copyfile(onnx, tmp)
        onnx = out / onnx.name
    plan = make_plan(onnx, target)
    spec = target.tensorrt
    argv = plan.trtexec_argv(trtexec="${TRTEXEC}")
    script = "\n".join([
        "#!/bin/sh",
        f"# Builds {ENGINE_FILE} for {target.name} ({spec.gpu}, JetPack {spec.jetpack}, TensorRT {spec.tensorrt}).",
        "# Run it on the device: an engine only runs on the GPU model and TensorRT version that built it.",
        "# For edgetransfer's own runtime (and its sidecar checks), prefer `edgetransfer compile` (BUILD_ON_DEVICE.md).",
        "set -eu",
        'cd "$(dirname "$0")"',
        f'TRTEXEC="${{TRTEXEC:-{JETSON_TRTEXEC}}}"',
        " ".join(a if a.startswith("${") else shlex.quote(a) for a in argv[:1]) + " \\\n  "
        + " \\\n  ".join(shlex.quote(a) for a in argv[1:]),
        "",
    ])
    with atomic_path(out / SCRIPT_FILE) as tmp:
        tmp.write_text(script, encoding="utf-8")
        os.chmod(tmp, 0o755)
    target_arg = _target_arg(target, out)
    commands = {
        "check": f"edgetransfer check RUN --target {target_arg}",
        "compile": f"edgetransfer compile RUN --target {target_arg}",
        "validate": f"edgetransfer validate RUN --target {target_arg}",
        "trtexec": f"sh RUN/{out.name}/{SCRIPT_FILE}",
    }
    write_text(out / README_FILE, _readme(target, out.name, plan.to_dict(), commands, reason))
    files = [onnx.name, SCRIPT_FILE, README_FILE, "target.yaml"]
    files += [f for f in ("check.json", "check.md") if (out / f).exists()]
    record = {
        "schema": 1, "kind": "tensorrt-build-kit", "target": target.name, "why": reason,
        "device": {"jetpack": spec.jetpack, "tensorrt": spec.tensorrt, "gpu": spec.gpu,
                   "compute_capability": spec.compute_capability},
        "onnx": {"file": onnx.name, "sha256": sha256_file(onnx)},
        "plan": plan.to_dict(), "trtexec": plan.trtexec_argv(trtexec=JETSON_TRTEXEC), "commands": commands,
        "preflight": None if preflight is None else {"passed": preflight.passed, "errors": len(preflight.errors)},
        "files": {f: sha256_file(out / f) for f in files if (out / f).exists()},
    }
    write_json(out / KIT_FILE, record)
    return out / README_FILE


def _readme(target: Any, folder: str, plan: dict[str, Any], commands: dict[str, str], reason: str) -> str:
    spec = target.tensorrt
    precision = ("strongly typed: INT8 where the Q/DQ nodes say, the rest as the ONNX declares it"
                 if plan["strongly_typed"] else
                 ", ".join(p for p, on in (("INT8 (explicit Q/DQ)", plan["int8"]), ("fp16 fallback", plan["fp16"])) if on)
                 or "fp32")
    dla = f"DLA core {plan['dla_core']} with GPU fallback" if plan["dla_core"] is not None else "GPU"
    return f"""# Build the {target.name} engine on the device

This folder was written where the engine could not be built ({reason}). A TensorRT engine only runs on
the GPU model and TensorRT version that built it, so it is built on the device itself:
{spec.gpu}, JetPack {spec.jetpack}, TensorRT {spec.tensorrt} (compute capability {spec.compute_capability}).

## With edgetransfer on the device (recommended)

Copy the whole run folder (RUN: the folder holding `meta.json`, `model.onnx` and `{folder}/`) to the
device, install edgetransfer there (JetPack's `python3-libnvinfer` provides `import tensorrt`), then:

```sh
python3 -c "import tensorrt; print(tensorrt.__version__)"   # expect {spec.tensorrt}.x
{commands['check']}      # preflight: operators, opset, shapes, INT8 fusion
{commands['compile']}    # builds {folder}/{ENGINE_FILE} + engine.json (sidecar)
{commands['validate']} --data HELD_OUT_IMAGES   # engine vs INT8 ONNX vs torch fp32
```

`compile` refuses to build on a machine whose GPU is not the target's, and loading an engine whose
sidecar names another GPU or TensorRT version fails with exit 3 before TensorRT deserializes it.

## With trtexec only (C++ / DeepStream deployments)

```sh
{commands['trtexec']}
```

It builds `{ENGINE_FILE}` from `{plan['onnx']}` with the same settings ({precision}; {dla}; batch
{plan['batch'][0]}–{plan['batch'][2]}, optimised for {plan['batch'][1]}; workspace {plan['workspace_mb']} MiB;
timing cache `timing.cache`) and writes `layers.json`, which lists the precision each layer ran in.
An engine built this way has no sidecar; edgetransfer's runtime refuses it.
"""
