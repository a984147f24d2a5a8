"""One behavioural template, run against every registered backend that can run here.

Each backend compiles the same tiny real ONNX model for an fp32 target, loads the artifact and must
reproduce ONNX Runtime's logits (1e-4 abs) at batch 1 and batch 4, say which precision ran, write
its artifact atomically, and stop serving `infer` once its context has exited. A backend that cannot
run here (not installed, no GPU: TensorRT on a CPU machine) is skipped with its own reason.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgetransfer.backends import backend_names, get_backend
from edgetransfer.targets import Target

from . import CLASSES, inputs, ort_run, tiny_models

#: torch's artifact is a run folder (checkpoint + meta), not an ONNX file: it neither compiles ONNX nor
#: loads one, so this template does not apply. torch vs ONNX Runtime is the export-fidelity pair,
#: tested where the export is.
NOT_ONNX = {"torch"}
#: the device name each runtime spells for "this machine's default"; others use "cpu"
DEVICE = {"openvino": "CPU", "tensorrt": "gpu"}

FP32_ATOL = 1e-4


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_models(tmp_path_factory)


def fp32_target(backend: str, threads: int = 0) -> Target:
    return Target(name=f"contract-{backend}", description="contract test", backend=backend,  # type: ignore[arg-type]
                  device=DEVICE.get(backend, "cpu"), precision="fp32", threads=threads)


def test_the_contract_covers_every_onnx_backend():
    assert {"onnxruntime", "openvino"} <= set(backend_names())
    assert set(backend_names()) - NOT_ONNX, "no backend left to test"


def test_reference_outputs_vary(tiny):
    """Guards the template itself: a model whose logits ignore the input would pass any comparison."""
    y = ort_run(tiny.fp32, inputs(48, seed=3))
    assert y.shape == (48, CLASSES)
    assert np.ptp(y, axis=0).min() > 0.1, "logits do not depend on the input"
    assert len(np.unique(y.argmax(1))) >= 3, "top-1 barely changes across inputs"


@pytest.mark.parametrize("name", [n for n in backend_names() if n not in NOT_ONNX])
def test_backend_contract(name, tiny, tmp_path):
    backend = get_backend(name, require=False)
    if (reason := backend.available()) is not None:
        pytest.skip(f"backend {name} not usable here: {reason}")
    target = fp32_target(name, threads=1)
    out = tmp_path / "compiled"

    artifact = backend.compile(tiny.fp32, target, out)

    assert artifact.is_file() and artifact.parent == out
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not leftovers, f"temporary files left behind: {leftovers}"

    runner = backend.load(artifact, target)
    batches = {n: inputs(n, seed=10 + n) for n in (1, 4)}
    with runner as active:
        assert isinstance(active.precision, str) and active.precision.strip()
        assert isinstance(active.description, str) and active.description.strip()
        for n, x in batches.items():
            y = active.infer(x)
            assert isinstance(y, np.ndarray) and y.dtype == np.float32
            assert y.shape == (n, CLASSES)
            np.testing.assert_allclose(y, ort_run(tiny.fp32, x), rtol=0, atol=FP32_ATOL,
                                       err_msg=f"{name} ({active.precision}) differs from ONNX Runtime at batch {n}")
        # same input twice, same answer (no state carried between calls)
        np.testing.assert_array_equal(active.infer(batches[4]), active.infer(batches[4]))

    with pytest.raises(Exception):  # noqa: B017 — any error will do; a released runner must not serve
        runner.infer(batches[1])
