"""export.py and validate.py on the shared trained run: a real ONNX file, run in ONNX Runtime,
compared with torch; and a deliberately broken export that validate must catch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from edgetransfer.adapt.checkpoint import load_model
from edgetransfer.cli import main
from edgetransfer.errors import DataError, UsageError
from edgetransfer.export import export_module, export_onnx
from edgetransfer.preprocess import load_image, preprocess
from edgetransfer.spec import InputSpec, RunMeta
from edgetransfer.validate import validate


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _test_images(meta: RunMeta, data, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The test split's images through the deployment preprocessing, with labels by class name."""
    files = sorted((data / "test").rglob("*.png"))[:n]
    x = np.stack([preprocess(load_image(p), meta.input_spec) for p in files])
    y = np.array([meta.classes.index(p.parent.name) for p in files])
    return x, y


def _torch_logits(run, x: np.ndarray) -> np.ndarray:
    model, _ = load_model(run)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _pair(report, prefix: str):
    matches = [p for p in report.pairs if p.pair.startswith(prefix)]
    assert len(matches) == 1, [p.pair for p in report.pairs]
    return matches[0]


@pytest.fixture(scope="module")
def reference(exported_run, tiny_data):
    """Torch logits of the shared run on all test images, with a sanity check that they carry signal."""
    meta = RunMeta.load(exported_run / "meta.json")
    x, y = _test_images(meta, tiny_data)
    logits = _torch_logits(exported_run, x)
    # a constant model would pass every parity check below: make sure this one is not
    assert logits.std(axis=0).max() > 1e-3, logits
    assert len(set(logits.argmax(1).tolist())) > 1, logits.argmax(1)
    return meta, x, y, logits


# ---- export -------------------------------------------------------------------------------------

def test_export_passes_the_checker_and_has_a_dynamic_batch(exported_run):
    model = onnx.load(str(exported_run / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    assert not list(exported_run.glob(".model.onnx.*"))  # no temporary left behind


def test_export_metadata_carries_classes_and_input_spec(exported_run):
    meta = RunMeta.load(exported_run / "meta.json")
    props = {p.key: p.value for p in onnx.load(str(exported_run / "model.onnx")).metadata_props}
    assert json.loads(props["edgetransfer.classes"]) == meta.classes
    assert InputSpec.from_dict(json.loads(props["edgetransfer.input_spec"])) == meta.input_spec
    assert props["edgetransfer.backbone"] == "resnet18"
    assert props["edgetransfer.data_hash"] == meta.data["hash"]
    # the same metadata is visible to a runtime that has no onnx package
    runtime_props = _session(exported_run / "model.onnx").get_modelmeta().custom_metadata_map
    assert json.loads(runtime_props["edgetransfer.classes"]) == meta.classes


def test_onnx_matches_torch_at_several_batch_sizes(exported_run, reference):
    meta, x, _, logits = reference
    sess = _session(exported_run / "model.onnx")
    name = sess.get_inputs()[0].name
    five = sess.run(None, {name: x[:5]})[0]
    one = np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(5)])
    assert five.shape == (5, len(meta.classes)) and one.shape == five.shape
    np.testing.assert_allclose(five, logits[:5], atol=1e-4, rtol=0)
    np.testing.assert_allclose(one, five, atol=1e-5, rtol=0)
    # random inputs too (outside the image distribution), and they must not all look alike
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(7, 3, meta.input_spec.height, meta.input_spec.width)).astype(np.float32) * 2
    ref = _torch_logits(exported_run, noise)
    assert ref.std(axis=0).max() > 1e-3
    np.testing.assert_allclose(sess.run(None, {name: noise})[0], ref, atol=1e-4, rtol=0)


class _InplaceNet(torch.nn.Module):
    """ReLU6(inplace=True) between layers, as in timm's EfficientNet-Lite; records what the tracer saw."""

    def __init__(self, seen: list[bool]) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.act = torch.nn.ReLU6(inplace=True)
        self.head = torch.nn.Linear(4, 3)
        self.seen = seen  # not a module attribute the exporter could copy: the caller's own list

    def forward(self, x):
        self.seen.append(self.act.inplace)
        return self.head(self.act(self.conv(x) * 4.0).mean((2, 3)))  # x4: some values clip at 6


def test_export_traces_inplace_activations_out_of_place_and_puts_them_back(tmp_path):
    seen: list[bool] = []
    model = _InplaceNet(seen).eval()
    onnx_path = export_module(model, InputSpec(height=16, width=16), tmp_path / "m.onnx")
    assert seen and not any(seen)                                    # the exporter traced them out of place
    assert model.act.inplace is True                                 # and the model is as it was
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert float(np.abs(expected).max()) > 0 and (model.conv(torch.from_numpy(x)) * 4.0 > 6).any()
    np.testing.assert_allclose(_session(onnx_path).run(None, {"input": x})[0], expected, atol=1e-5)


def test_export_of_a_folder_that_is_not_a_run_is_exit_2(tmp_path):
    with pytest.raises(UsageError) as info:
        export_onnx(tmp_path)
    assert "meta.json" in str(info.value)
    result = CliRunner().invoke(main, ["export", str(tmp_path)])
    assert result.exit_code == 2 and "meta.json" in result.output


# ---- validate -----------------------------------------------------------------------------------

def test_validate_passes_on_a_fresh_export_and_writes_its_reports(run_copy, reference):
    meta, x, y, logits = reference
    report = validate(run_copy)
    assert report.passed
    fidelity = _pair(report, "export fidelity")
    assert fidelity.samples == len(x)
    assert fidelity.reference.precision == "fp32" and fidelity.candidate.precision == "fp32"
    assert "torch" in fidelity.reference.name and "onnxruntime" in fidelity.candidate.name
    assert fidelity.max_abs_diff <= 1e-4 and fidelity.agreement == 1.0
    # validate labels by class name and feeds the deployment preprocessing: its torch accuracy is ours
    assert fidelity.reference_accuracy == pytest.approx(float((logits.argmax(1) == y).mean()))
    assert fidelity.reference_accuracy == pytest.approx(meta.metrics["test_accuracy"])

    saved = json.loads((run_copy / "parity.json").read_text())
    assert saved["passed"] is True
    assert all(p["reference"]["precision"] and p["candidate"]["precision"] for p in saved["pairs"])
    md = (run_copy / "parity.md").read_text()
    assert "PASSED" in md and "(fp32)" in md
    assert (run_copy / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _shift_one_logit(onnx_path, cls: int, amount: float) -> None:
    """Tamper with the exported graph: add `amount` to the final layer's bias for class `cls`."""
    model = onnx.load(str(onnx_path))
    out_name = model.graph.output[0].name
    last = next(n for n in model.graph.node if out_name in n.output)
    assert last.op_type == "Gemm", last.op_type
    inits = {i.name: i for i in model.graph.initializer}
    bias = inits[last.input[2]]
    values = numpy_helper.to_array(bias).copy()
    values[cls] += amount
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(onnx_path))


def test_a_broken_export_fails_validation_and_the_cli_exits_1(run_copy, reference):
    meta, x, _, logits = reference
    target = int(np.bincount(logits.argmax(1), minlength=len(meta.classes)).argmin())  # least predicted class
    _shift_one_logit(run_copy / "model.onnx", target, 50.0)
    sess = _session(run_copy / "model.onnx")
    assert (sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == target).all()  # tampering took

    report = validate(run_copy)
    assert not report.passed
    fidelity = _pair(report, "export fidelity")
    assert fidelity.max_abs_diff == pytest.approx(50.0, abs=1e-3)
    assert fidelity.agreement < 1.0
    assert any("max abs diff" in f for f in fidelity.failures)
    assert any("agreement" in f for f in fidelity.failures)
    assert json.loads((run_copy / "parity.json").read_text())["passed"] is False
    assert "FAILED" in (run_copy / "parity.md").read_text()

    result = CliRunner().invoke(main, ["validate", str(run_copy)])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "parity.md" in result.output


def test_validate_on_a_folder_of_class_subfolders(run_copy, tiny_data, tmp_path, reference):
    meta, *_ = reference
    folder = tmp_path / "new_images"
    picked = [meta.classes[-1], meta.classes[1]]  # a subset, in a different order: labels go by name
    for name in picked:
        shutil.copytree(tiny_data / "test" / name, folder / name)
    files = sorted(folder.rglob("*.png"))
    x = np.stack([preprocess(load_image(p), meta.input_spec) for p in files])
    y = np.array([meta.classes.index(p.parent.name) for p in files])
    expected_acc = float((_torch_logits(run_copy, x).argmax(1) == y).mean())

    report = validate(run_copy, folder)
    assert report.passed
    fidelity = _pair(report, "export fidelity")
    assert fidelity.samples == len(files) == 2 * len(list((tiny_data / "test" / picked[0]).iterdir()))
    assert fidelity.reference_accuracy == pytest.approx(expected_acc)
    assert str(folder) in report.context["data"]

    result = CliRunner().invoke(main, ["validate", str(run_copy), "--data", str(folder)])
    assert result.exit_code == 0, result.output


def test_validate_data_with_an_unknown_class_is_exit_2(run_copy, tiny_data, tmp_path, reference):
    meta, *_ = reference
    folder = tmp_path / "with_unknown"
    shutil.copytree(tiny_data / "test" / meta.classes[0], folder / meta.classes[0])
    shutil.copytree(tiny_data / "test" / meta.classes[1], folder / "dent")
    with pytest.raises(DataError) as info:
        validate(run_copy, folder)
    assert "dent" in str(info.value)
    result = CliRunner().invoke(main, ["validate", str(run_copy), "--data", str(folder)])
    assert result.exit_code == 2, result.output
    assert "dent" in result.output
    assert not (run_copy / "parity.json").exists()


def test_validate_without_an_export_is_exit_2(run_copy):
    (run_copy / "model.onnx").unlink()
    result = CliRunner().invoke(main, ["validate", str(run_copy)])
    assert result.exit_code == 2, result.output
    assert "model.onnx" in result.output and "export" in result.output
