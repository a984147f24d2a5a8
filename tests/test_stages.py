"""The per-target stages (quantize → compile → validate) on a copy of the shared exported run, with
real ONNX Runtime, NNCF and OpenVINO: what each writes, what it refuses, and that the parity gate
catches an INT8 model whose outputs were tampered with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

from edgetransfer.cli import main
from edgetransfer.data.folder import scan_dataset
from edgetransfer.errors import DependencyError
from edgetransfer.fsutil import sha256_file
from edgetransfer.schema import from_dict, to_dict
from edgetransfer.stages import COMPILED_FILE, INT8_FILE, compile_run, quantize_run
from edgetransfer.targets import Target, load_target
from edgetransfer.validate import validate

RUN_FILES = ("meta.json", "model.safetensors", "model.onnx", "train_config.json", "split.json")


def _copy_run(src: Path, dst: Path, *targets: str) -> Path:
    dst.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy2(src / name, dst / name)
    for t in targets:
        shutil.copytree(src / t, dst / t)
    return dst


@pytest.fixture(scope="module")
def staged(exported_run, tmp_path_factory):
    """A copy of the shared run, quantized for three targets and compiled for two (quick calibration)."""
    run = _copy_run(exported_run, tmp_path_factory.mktemp("staged") / "run")
    results = {t: quantize_run(run, t, calib="quick") for t in ("x86-onnxruntime", "intel-cpu", "jetson-orin-nano")}
    # a barely trained model on 30 images may miss the quantization gates: compiled anyway, as the
    # stages after quantize are what these tests look at (test_compile_refuses_... checks the refusal)
    artifacts = {t: compile_run(run, t, allow_failed=True) for t in ("x86-onnxruntime", "intel-cpu")}
    return run, results, artifacts


def _pair(pairs: list[dict], prefix: str) -> dict:
    matches = [p for p in pairs if p["pair"].startswith(prefix)]
    assert len(matches) == 1, [p["pair"] for p in pairs]
    return matches[0]


# ---- quantize ----------------------------------------------------------------------------------

def test_compile_refuses_an_int8_model_that_missed_its_quantization_gates(staged, tmp_path):
    """quantize exits 1 yet keeps the file for inspection: compile must not take it silently."""
    run = _copy_run(staged[0], tmp_path / "run", "x86-onnxruntime")
    record = run / "x86-onnxruntime" / "quantization.json"
    quantization = json.loads(record.read_text())
    quantization["within_gates"] = False
    quantization["advice"] = ["`--calib percentile`: measured drop 0.00 points"]
    record.write_text(json.dumps(quantization))
    before = sorted(p.name for p in (run / "x86-onnxruntime").iterdir())
    result = CliRunner().invoke(main, ["compile", str(run), "--target", "x86-onnxruntime"])
    assert result.exit_code == 1, result.output
    assert "missed x86-onnxruntime's quantization gates" in " ".join(result.output.split())
    assert "--allow-failed" in result.output and "--calib percentile" in result.output
    assert sorted(p.name for p in (run / "x86-onnxruntime").iterdir()) == before  # nothing new compiled
    result = CliRunner().invoke(main, ["compile", str(run), "--target", "x86-onnxruntime", "--allow-failed"])
    assert result.exit_code == 0, result.output
    quantization["within_gates"] = True
    record.write_text(json.dumps(quantization))
    assert CliRunner().invoke(main, ["compile", str(run), "--target", "x86-onnxruntime"]).exit_code == 0


def test_quantize_writes_a_qdq_model_and_its_records(staged, tiny_data):
    run, results, _ = staged
    out = run / "x86-onnxruntime"
    model = onnx.load(str(out / INT8_FILE))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 5 and "DequantizeLinear" in ops
    assert results["x86-onnxruntime"].model == out / INT8_FILE

    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["preset"] == "quick" and calibration["count"] == len(calibration["files"]) > 0
    splits = scan_dataset(tiny_data, verify=False)
    rel = {s.path.resolve().relative_to(Path(splits.root).resolve()).as_posix(): split
           for split in ("train", "val", "test") for s in splits.split(split)}
    used = {f["path"] for f in calibration["files"]}
    assert used <= {p for p, split in rel.items() if split in ("train", "val")}
    assert not used & {p for p, split in rel.items() if split == "test"}

    quantization = json.loads((out / "quantization.json").read_text())
    assert quantization["quantizer"] == "onnxruntime"  # what the x86 profile names
    assert {"fp32_val_accuracy", "int8_val_accuracy", "drop", "within_budget", "excluded_layers", "agreement",
            "agreement_samples", "min_agreement", "within_gates", "advice", "validation_samples"} <= set(quantization)
    assert quantization["validation_samples"] == len(splits.val)
    assert quantization["min_agreement"] == load_target("x86-onnxruntime").gates.quantization.min_agreement

    written = from_dict(Target, yaml.safe_load((out / "target.yaml").read_text()))
    assert written == load_target("x86-onnxruntime")


def test_jetson_quantization_has_zero_point_0_everywhere(staged):
    # TensorRT runs explicit quantization only as signed INT8 with zero point 0
    run, results, _ = staged
    model = onnx.load(str(run / "jetson-orin-nano" / INT8_FILE))
    inits = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    activations = 0
    for node in qdq:
        assert len(node.input) == 3, f"{node.name}: no explicit zero point"
        zp = inits[node.input[2]]
        assert not numpy_helper.to_array(zp).any(), f"{node.name}: zero point {numpy_helper.to_array(zp)}"
        if node.op_type == "QuantizeLinear":  # activations (weights are stored quantized, with DQ only)
            activations += 1
            assert zp.data_type == TensorProto.INT8, f"{node.name}: {TensorProto.DataType.Name(zp.data_type)}"
    assert activations > 5


# ---- compile -----------------------------------------------------------------------------------

@pytest.mark.parametrize("target, files", [("x86-onnxruntime", ("model.onnx", "session.json")),
                                           ("intel-cpu", ("model.xml", "model.bin", "compile.json"))])
def test_compile_writes_the_artifact_and_a_record_of_its_source(staged, target, files):
    run, _, artifacts = staged
    out = run / target
    for name in files:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    record = json.loads((out / COMPILED_FILE).read_text())
    assert out / record["artifact"] == artifacts[target]
    assert record["source"] == INT8_FILE
    assert record["source_sha256"] == sha256_file(out / INT8_FILE)
    assert record["backend"] == load_target(target).backend and record["precision"] == "int8"


def test_compile_before_quantize_is_exit_2_naming_the_file_and_the_command(run_copy):
    result = CliRunner().invoke(main, ["compile", str(run_copy), "--target", "x86-onnxruntime"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert str(run_copy / "x86-onnxruntime" / INT8_FILE) in text
    assert f"edgetransfer quantize {run_copy} --target x86-onnxruntime" in text
    assert "Traceback" not in result.output
    assert not (run_copy / "x86-onnxruntime").exists()


def test_an_absent_gpu_compiles_but_validate_is_exit_3_naming_it(staged, tmp_path):
    import openvino as ov

    if "GPU" in {d.split(".")[0] for d in ov.Core().available_devices}:
        pytest.skip("this machine has an OpenVINO GPU device")
    run = _copy_run(staged[0], tmp_path / "run")
    # intel-igpu quantizes like intel-cpu: reuse that QDQ model rather than calibrating again
    (run / "intel-igpu").mkdir()
    shutil.copy2(staged[0] / "intel-cpu" / INT8_FILE, run / "intel-igpu" / INT8_FILE)
    artifact = compile_run(run, "intel-igpu")  # OpenVINO IR does not depend on the device
    assert artifact.name == "model.xml" and artifact.with_suffix(".bin").is_file()
    assert json.loads((run / "intel-igpu" / COMPILED_FILE).read_text())["device"] == "GPU"

    with pytest.raises(DependencyError) as info:
        validate(run, target="intel-igpu")
    assert info.value.exit_code == 3 and "GPU" in str(info.value)
    result = CliRunner().invoke(main, ["validate", str(run), "--target", "intel-igpu"])
    assert result.exit_code == 3, result.output
    assert "GPU" in result.output and "not present" in result.output and "Traceback" not in result.output
    assert not (run / "intel-igpu" / "parity.json").exists()


def test_a_tensorrt_target_is_a_missing_dependency_not_a_usage_error(staged):
    run = staged[0]
    with pytest.raises(DependencyError) as info:  # (allow_failed: this barely trained model may miss the gates)
        compile_run(run, "jetson-orin-nano", allow_failed=True)
    assert info.value.exit_code == 3 and "TensorRT" in str(info.value)


# ---- validate ----------------------------------------------------------------------------------

def test_validate_for_a_target_writes_every_pair(staged):
    run = staged[0]
    report = validate(run, target="intel-cpu")
    parity = json.loads((run / "intel-cpu" / "parity.json").read_text())
    assert (run / "intel-cpu" / "parity.md").is_file()
    assert parity["passed"] is report.passed
    pairs = parity["pairs"]
    assert len(pairs) == 4
    export = _pair(pairs, "export fidelity")
    quant = _pair(pairs, "quantization effect")
    compiler = _pair(pairs, "compiler fidelity")
    batch = _pair(pairs, "dynamic batch")
    assert (export["reference"]["precision"], export["candidate"]["precision"]) == ("fp32", "fp32")
    assert (quant["reference"]["precision"], quant["candidate"]["precision"]) == ("fp32", "int8")
    assert compiler["reference"]["precision"] == "int8"
    assert "openvino" in compiler["candidate"]["name"] and compiler["candidate"]["precision"].startswith("int8")
    assert "openvino" in batch["reference"]["name"]
    for p in pairs:
        assert p["samples"] > 0 and p["reference"]["precision"] and p["candidate"]["precision"]
    assert export["passed"] is True
    assert parity["latency"]["p50_ms"] > 0 and parity["latency"]["batch"] == 1
    summary = parity["summary"]
    assert 0.0 <= summary["fp32_accuracy"] <= 1.0 and 0.0 <= summary["accuracy"] <= 1.0
    assert 0.0 <= summary["agreement"] <= 1.0
    # compiled vs QDQ are close. In logits, not top-1: this tiny model sits at chance with near-tied
    # logits, so on its 10 images a 0.02 logit difference flips predictions
    assert compiler["min_cosine"] >= 0.95 and compiler["mean_abs_diff"] < 0.05, compiler


def _roll_final_layer(path: Path, classes: int) -> None:
    """Rotate the class rows of the last Gemm's weights and bias (through their DequantizeLinear)."""
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    gemm = [n for n in graph.node if n.op_type == "Gemm"][-1]
    rolled = 0
    for name in gemm.input[1:]:
        dq = producer.get(name)
        names = list(dq.input) if dq is not None and dq.op_type == "DequantizeLinear" else [name]
        for n in names:
            if n in inits and inits[n].dims and inits[n].dims[0] == classes:
                a = numpy_helper.to_array(inits[n])
                inits[n].CopyFrom(numpy_helper.from_array(np.roll(a, 1, axis=0), n))
                rolled += 1
    assert rolled >= 2, "did not find the final layer's weights and bias"
    onnx.save(model, str(path))


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_a_tampered_int8_model_fails_the_quantization_gate(staged, tmp_path):
    src = staged[0]
    run = _copy_run(src, tmp_path / "run")
    # the x86 profile with gates this barely trained model can meet, so the gate flips on tampering only
    profile = to_dict(load_target("x86-onnxruntime"))
    profile["name"] = "x86-loose"
    profile["gates"]["quantization"] = {"min_agreement": 0.7, "max_accuracy_drop": 30.0}
    target = tmp_path / "x86-loose.yaml"
    target.write_text(yaml.safe_dump(profile))
    out = run / "x86-loose"
    out.mkdir()
    int8 = out / INT8_FILE
    shutil.copy2(src / "x86-onnxruntime" / INT8_FILE, int8)
    compile_run(run, target)
    before = validate(run, target=target)
    assert before.passed, [(p.pair, p.failures) for p in before.pairs]

    classes = len(json.loads((run / "meta.json").read_text())["classes"])
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    clean = _logits(int8, x)
    _roll_final_layer(int8, classes)
    tampered = _logits(int8, x)
    # the tampering took: class c now answers what class c−1 answered. Compared as logits, not as argmax:
    # a barely trained INT8 model ties top logits on some inputs, and which of a tie wins after the roll
    # depends on the CPU's rounding (an AMD Zen 5 broke the argmax form of this check)
    assert np.allclose(tampered, np.roll(clean, 1, axis=1), atol=1e-4 * max(1.0, float(np.abs(clean).max())))
    compile_run(run, target)  # compiled from the tampered model: only the quantization effect changes

    result = CliRunner().invoke(main, ["validate", str(run), "--target", str(target)])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and f"report: {out}/parity.md" in " ".join(result.output.split())
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] is False
    quant = _pair(parity["pairs"], "quantization effect")
    assert quant["passed"] is False and quant["agreement"] < 0.7
    assert any("agreement" in f for f in quant["failures"])
    # a failed gate says what to try next, on the console and in parity.md
    assert "try next" in result.output and "--calib percentile" in result.output
    assert any("--quantizer nncf" in a for a in quant["advice"])
    assert any("--max-fallback-layers" in a for a in quant["advice"])
    markdown = (out / "parity.md").read_text()
    assert "quantization effect: torch fp32 vs INT8 QDQ (ONNX Runtime): what to try next" in markdown
    assert "--calib percentile" in markdown
    assert _pair(parity["pairs"], "export fidelity")["passed"] is True
    assert _pair(parity["pairs"], "compiler fidelity")["passed"] is True
