"""TensorRT for Jetson targets, tested where TensorRT cannot be installed: the preflight (operator
table, opset, shapes, INT8 scheme and fusion), the on-device build kit and its trtexec command, the
engine sidecar checks, and the exit codes of check / compile / validate. The engine build itself
runs only where `import tensorrt` works and a GPU is visible; that test skips here with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgetransfer.backends import get_backend
from edgetransfer.backends.tensorrt.plan import make_plan
from edgetransfer.backends.tensorrt.preflight import preflight
from edgetransfer.backends.tensorrt.sidecar import SIDECAR_FILE, Machine, check_engine, engine_problems
from edgetransfer.cli import main
from edgetransfer.errors import DependencyError, GateFailed, IntegrityError
from edgetransfer.export import export_onnx
from edgetransfer.fsutil import sha256_file
from edgetransfer.stages import COMPILED_FILE, INT8_FILE, compile_run, quantize_run
from edgetransfer.targets import BatchRange, load_target

RUN_FILES = ("meta.json", "model.safetensors", "model.onnx", "train_config.json", "split.json")
ORIN = load_target("jetson-orin-nano")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy2(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def jetson_run(exported_run, tmp_path_factory) -> Path:
    """A copy of the shared run, quantized for jetson-orin-nano with the profile's TensorRT scheme."""
    run = _copy(exported_run, tmp_path_factory.mktemp("jetson") / "run")
    quantize_run(run, "jetson-orin-nano", calib="quick")
    return run


def _no_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is None


# ---- the QDQ model TensorRT wants --------------------------------------------------------------

def test_the_jetson_qdq_model_passes_the_preflight(jetson_run):
    model = onnx.load(str(jetson_run / "jetson-orin-nano" / INT8_FILE))
    inits = {i.name: i for i in model.graph.initializer}
    dq_types = {inits[n.input[0]].data_type for n in model.graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    assert dq_types == {TensorProto.INT8}  # no INT32 biases: TensorRT's DequantizeLinear takes INT8 only

    result = CliRunner().invoke(main, ["check", str(jetson_run), "--target", "jetson-orin-nano"])
    assert result.exit_code == 0, result.output
    assert "builds for jetson-orin-nano" in result.output and "Conv" in result.output
    report = json.loads((jetson_run / "jetson-orin-nano" / "check.json").read_text())
    assert report["passed"] and report["checked"] == INT8_FILE
    assert all(r["status"] == "supported" for r in report["operators"])
    assert {"Conv", "QuantizeLinear", "DequantizeLinear"} <= {r["op"] for r in report["operators"]}
    int8 = report["int8"]
    assert 0 < int8["int8_layers"] <= int8["weighted_layers"]
    assert int8["int8_layers"] + len(int8["float_layers"]) == int8["weighted_layers"]


def test_an_opset_newer_than_tensorrt_8_reads_is_refused_with_the_fix(jetson_run, tmp_path):
    result = CliRunner().invoke(main, ["check", str(jetson_run), "--target", "jetson-xavier-nx"])
    assert result.exit_code == 1, result.output
    assert "CANNOT BUILD" in result.output and "--opset 17" in result.output
    assert json.loads((jetson_run / "jetson-xavier-nx" / "check.json").read_text())["passed"] is False

    run = _copy(jetson_run, tmp_path / "run17")  # the fix the message names: export at opset 17
    export_onnx(run, opset=17)
    result = CliRunner().invoke(main, ["check", str(run), "--target", "jetson-xavier-nx"])
    assert result.exit_code == 0, result.output
    assert "no Q/DQ nodes" in result.output  # not quantized yet: checked on the fp32 export, and says so


# ---- hand-built graphs: one problem each --------------------------------------------------------

def _model(nodes, inits=(), *, dims=("batch", 3, 8, 8), opset=18, out_dims=("batch", 4), domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_dims))],
                              initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def _check(tmp_path, model, target=ORIN):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return preflight(path, target)


def _messages(report, level="error"):
    return " | ".join(f.message for f in report.findings if f.level == level)


def _conv_weights():
    return numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")


def _pool():
    return [helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["logits"])]


def test_a_plain_conv_model_passes(tmp_path):
    report = _check(tmp_path, _model([helper.make_node("Conv", ["input", "w"], ["conv"]), *_pool()], [_conv_weights()]))
    assert report.passed and _messages(report, "warning").startswith("no Q/DQ nodes: this is the fp32 model")
    fp16 = dataclasses.replace(ORIN, precision="fp16", quantization=None)
    assert not _check(tmp_path, _model([helper.make_node("Conv", ["input", "w"], ["conv"]), *_pool()],
                                       [_conv_weights()]), fp16).findings


def test_unsupported_and_custom_domain_operators_are_errors(tmp_path):
    nodes = [helper.make_node("Conv", ["input", "w"], ["conv"]),
             helper.make_node("Gelu", ["conv"], ["g"], domain="com.microsoft"),
             helper.make_node("Unique", ["g"], ["u"]),
             helper.make_node("GlobalAveragePool", ["g"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["logits"])]
    report = _check(tmp_path, _model(nodes, [_conv_weights()], domains=["com.microsoft"]))
    assert not report.passed
    rows = {r.op: r.status for r in report.operators}
    assert rows["Unique"] == "unsupported" and rows["Gelu"] == "unsupported" and rows["Conv"] == "supported"
    errors = _messages(report)
    assert "Unique is not supported by TensorRT 10.3" in errors and "com.microsoft::Gelu" in errors


def test_shapes_only_the_batch_may_vary_and_it_must_cover_the_target(tmp_path):
    conv = [helper.make_node("Conv", ["input", "w"], ["conv"]), *_pool()]
    report = _check(tmp_path, _model(conv, [_conv_weights()], dims=("batch", 3, "h", "w")))
    assert "dynamic H=h, W=w" in _messages(report)
    report = _check(tmp_path, _model(conv, [_conv_weights()], dims=(1, 3, 8, 8), out_dims=(1, 4)))
    assert "fixed batch of 1 but the target asks for 1–8" in _messages(report)

    dla = dataclasses.replace(ORIN, tensorrt=dataclasses.replace(ORIN.tensorrt, dla_cores=2, use_dla=True))
    report = _check(tmp_path, _model(conv, [_conv_weights()]), dla)
    assert "DLA engines take a static batch" in _messages(report)
    static = dataclasses.replace(dla, batch=BatchRange(4, 4, 4))
    assert _check(tmp_path, _model(conv, [_conv_weights()]), static).passed


def test_axes_computed_at_run_time_are_errors(tmp_path):
    nodes = [helper.make_node("Conv", ["input", "w"], ["conv"]),
             helper.make_node("Shape", ["conv"], ["shape"]),
             helper.make_node("ReduceMean", ["conv", "shape"], ["pooled"], keepdims=1),
             helper.make_node("Flatten", ["pooled"], ["logits"])]
    report = _check(tmp_path, _model(nodes, [_conv_weights()]))
    assert "ReduceMean: axes must be an initializer, here it is computed at run time" in _messages(report)


def _qdq(tensor, scale, zero, *, zero_type=TensorProto.INT8, tag="a"):
    """Q then DQ on `tensor`, with constant scale/zero point; returns nodes, initializers, output name."""
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), f"s_{tag}"),
             helper.make_tensor(f"z_{tag}", zero_type, np.shape(zero), np.ravel(zero).tolist())]
    nodes = [helper.make_node("QuantizeLinear", [tensor, f"s_{tag}", f"z_{tag}"], [f"q_{tag}"], name=f"Q_{tag}"),
             helper.make_node("DequantizeLinear", [f"q_{tag}", f"s_{tag}", f"z_{tag}"], [f"dq_{tag}"], name=f"DQ_{tag}")]
    return nodes, inits, f"dq_{tag}"


def _int8_weights(axis=0):
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.int8), "wq")
    s = numpy_helper.from_array(np.full(4 if axis == 0 else 3, 0.1, np.float32), "ws")
    z = numpy_helper.from_array(np.zeros(4 if axis == 0 else 3, np.int8), "wz")
    return [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=axis, name="DQ_w")], [w, s, z]


def test_the_symmetric_int8_scheme_passes(tmp_path):
    act, act_inits, x = _qdq("input", 0.05, 0)
    wn, wi = _int8_weights()
    report = _check(tmp_path, _model([*act, *wn, helper.make_node("Conv", [x, "w"], ["conv"]), *_pool()],
                                     act_inits + wi))
    assert report.passed, report.findings
    assert report.int8["int8_layers"] == report.int8["weighted_layers"] == 1


@pytest.mark.parametrize("case, expected", [
    ("uint8", "UINT8 Q/DQ: TensorRT 10 quantizes to INT8 only; quantize with `activations: symmetric`"),
    ("zero_point", "non-zero zero point"),
    ("per_channel_activation", "per-channel scales on an activation"),
    ("int32_bias", "INT32 Q/DQ: TensorRT 10 quantizes to INT8 only; quantized biases: set `quantization.bias: float`"),
    ("weight_axis", "Conv weights quantized per channel on axis 1; TensorRT needs axis 0"),
])
def test_int8_schemes_tensorrt_cannot_run_are_errors(tmp_path, case, expected):
    zero_type = TensorProto.UINT8 if case == "uint8" else TensorProto.INT8
    zero = 3 if case == "zero_point" else 0
    scale = 0.05
    if case == "per_channel_activation":
        scale, zero = [0.05, 0.05, 0.05], [0, 0, 0]
    act, act_inits, x = _qdq("input", scale, zero, zero_type=zero_type)
    wn, wi = _int8_weights(axis=1 if case == "weight_axis" else 0)
    conv_inputs = [x, "w"]
    if case == "int32_bias":
        wi += [numpy_helper.from_array(np.zeros(4, np.int32), "bq"), numpy_helper.from_array(np.float32(0.005), "bs")]
        wn.append(helper.make_node("DequantizeLinear", ["bq", "bs"], ["b"], name="DQ_bias"))
        conv_inputs.append("b")
    nodes = [*act, *wn, helper.make_node("Conv", conv_inputs, ["conv"]), *_pool()]
    if case == "per_channel_activation":
        for n in act:
            n.attribute.append(helper.make_attribute("axis", 1))
    report = _check(tmp_path, _model(nodes, act_inits + wi))
    assert not report.passed
    assert expected in _messages(report), _messages(report)


def test_a_dq_tensorrt_cannot_fuse_is_a_warning_naming_the_layer(tmp_path):
    act, act_inits, x = _qdq("input", 0.05, 0)
    wn, wi = _int8_weights()
    q2, q2_inits, y = _qdq("conv", 0.05, 0, tag="b")
    nodes = [*act, *wn, helper.make_node("Conv", [x, "w"], ["conv"]), *q2,
             helper.make_node("Softmax", [y], ["soft"], name="the_softmax", axis=1),
             helper.make_node("GlobalAveragePool", ["soft"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["logits"])]
    report = _check(tmp_path, _model(nodes, act_inits + wi + q2_inits))
    assert report.passed  # it builds; it just runs that layer in float
    warning = [f for f in report.findings if f.level == "warning"]
    assert len(warning) == 1 and "feeds Softmax" in warning[0].message and warning[0].nodes == ("the_softmax",)


def test_layers_with_only_weights_quantized_run_in_float(tmp_path):
    wn, wi = _int8_weights()
    report = _check(tmp_path, _model([*wn, helper.make_node("Conv", ["input", "w"], ["conv"], name="c"), *_pool()], wi))
    assert report.int8["int8_layers"] == 0 and report.int8["float_layers"] == ["c"]
    assert "only one of data and weights is quantized" in _messages(report, "warning")


def test_garbage_is_an_integrity_error(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(IntegrityError) as info:
        preflight(path, ORIN)
    assert info.value.exit_code == 4 and str(path) in str(info.value)


# ---- the build plan and trtexec -----------------------------------------------------------------

def test_the_trtexec_command_follows_the_profile(jetson_run):
    onnx_path = jetson_run / "jetson-orin-nano" / INT8_FILE
    argv = make_plan(onnx_path, ORIN).trtexec_argv()
    assert argv[:3] == ["trtexec", f"--onnx={INT8_FILE}", "--saveEngine=model.engine"]
    assert {"--minShapes=input:1x3x32x32", "--optShapes=input:1x3x32x32", "--maxShapes=input:8x3x32x32",
            "--memPoolSize=workspace:1024", "--timingCacheFile=timing.cache", "--int8", "--fp16"} <= set(argv)
    assert "--stronglyTyped" not in argv and not any(a.startswith("--useDLACore") for a in argv)

    strict = dataclasses.replace(ORIN, tensorrt=dataclasses.replace(ORIN.tensorrt, fp16_fallback=False))
    argv = make_plan(onnx_path, strict).trtexec_argv()
    assert "--stronglyTyped" in argv and "--int8" not in argv and "--fp16" not in argv

    agx = load_target("jetson-agx-orin")
    dla = dataclasses.replace(agx, batch=BatchRange(4, 4, 4),
                              tensorrt=dataclasses.replace(agx.tensorrt, use_dla=True, dla_core=1))
    argv = make_plan(onnx_path, dla).trtexec_argv()
    assert {"--useDLACore=1", "--allowGPUFallback", "--maxShapes=input:4x3x32x32", "--memPoolSize=workspace:4096"} <= set(argv)
    # TensorRT 8.5 has no strongly typed networks: its policy stays INT8 (+fp16 when allowed)
    xavier = load_target("jetson-xavier-nx")
    strict8 = dataclasses.replace(xavier, tensorrt=dataclasses.replace(xavier.tensorrt, fp16_fallback=False))
    argv = make_plan(onnx_path, strict8).trtexec_argv()
    assert "--int8" in argv and "--stronglyTyped" not in argv and "--fp16" not in argv


# ---- compile without TensorRT: the on-device build kit ------------------------------------------

@pytest.mark.skipif(not _no_tensorrt(), reason="TensorRT is installed here: compile builds the engine instead")
def test_compile_writes_the_build_kit_and_exits_3(jetson_run):
    result = CliRunner().invoke(main, ["compile", str(jetson_run), "--target", "jetson-orin-nano"])
    out = jetson_run / "jetson-orin-nano"
    assert result.exit_code == 3, result.output
    assert "TensorRT is not installed" in result.output and "build kit" in result.output
    assert str(out / "BUILD_ON_DEVICE.md") in result.output.replace("\n", "") and "Traceback" not in result.output
    assert not (out / COMPILED_FILE).exists() and not (out / "model.engine").exists()

    kit = json.loads((out / "kit.json").read_text())
    assert kit["kind"] == "tensorrt-build-kit" and kit["target"] == "jetson-orin-nano"
    assert kit["device"] == {"jetpack": "6.2", "tensorrt": "10.3", "gpu": ORIN.tensorrt.gpu, "compute_capability": "8.7"}
    assert kit["onnx"] == {"file": INT8_FILE, "sha256": sha256_file(out / INT8_FILE)}
    assert {INT8_FILE, "build_engine.sh", "BUILD_ON_DEVICE.md", "target.yaml", "check.json"} <= set(kit["files"])
    for name, digest in kit["files"].items():
        assert sha256_file(out / name) == digest, name
    assert kit["preflight"] == {"passed": True, "errors": 0}
    assert kit["trtexec"][0] == "/usr/src/tensorrt/bin/trtexec" and "--maxShapes=input:8x3x32x32" in kit["trtexec"]
    assert kit["commands"]["compile"] == "edgetransfer compile RUN --target jetson-orin-nano"

    script = (out / "build_engine.sh").read_text()
    assert os.access(out / "build_engine.sh", os.X_OK)
    assert script.startswith("#!/bin/sh") and "--saveEngine=model.engine" in script and "--int8" in script
    readme = (out / "BUILD_ON_DEVICE.md").read_text()
    assert "edgetransfer compile RUN --target jetson-orin-nano" in readme and "TensorRT 10.3" in readme

    # validate cannot run the engine here: exit 3, pointing at the kit (not "compile first")
    result = CliRunner().invoke(main, ["validate", str(jetson_run), "--target", "jetson-orin-nano"])
    assert result.exit_code == 3, result.output
    assert "TensorRT is not installed" in result.output and "Traceback" not in result.output


def test_compile_refuses_a_model_that_cannot_build_before_writing_a_kit(jetson_run, tmp_path):
    run = _copy(jetson_run, tmp_path / "run")
    shutil.copytree(jetson_run / "jetson-xavier-nx", run / "jetson-xavier-nx", dirs_exist_ok=True)
    shutil.copy2(jetson_run / "jetson-orin-nano" / INT8_FILE, run / "jetson-xavier-nx" / INT8_FILE)  # opset 18
    with pytest.raises(GateFailed) as info:
        compile_run(run, "jetson-xavier-nx")
    assert info.value.exit_code == 1 and "opset 18" in str(info.value)
    assert (run / "jetson-xavier-nx" / "check.md").is_file() and not (run / "jetson-xavier-nx" / "kit.json").exists()


# ---- the engine sidecar -------------------------------------------------------------------------

RECORD = {"schema": 1, "tensorrt": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7"}


def test_engine_compatibility_compares_tensorrt_release_gpu_and_compute_capability():
    assert engine_problems(RECORD, Machine("10.3.0.26", "Orin", "8.7")) == []  # build numbers may differ
    [trt] = engine_problems(RECORD, Machine("10.7.0", "Orin", "8.7"))
    assert "TensorRT 10.3.0.30 built it" in trt and "10.7.0" in trt
    [gpu] = engine_problems(RECORD, Machine("10.3.0", "NVIDIA H100 80GB HBM3", "9.0"))
    assert "built on Orin (compute capability 8.7)" in gpu and "H100" in gpu and "9.0" in gpu
    assert len(engine_problems(RECORD, Machine(None, None, None))) == 2


def _engine(folder: Path, record: dict | None = RECORD) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    engine = folder / "model.engine"
    engine.write_bytes(os.urandom(4096))  # never deserialized: the checks come first
    if record is not None:
        (folder / SIDECAR_FILE).write_text(json.dumps({**record, "engine_sha256": sha256_file(engine)}))
    return engine


def test_an_engine_for_another_device_is_exit_3_naming_both_sides(tmp_path):
    engine = _engine(tmp_path / "e")
    with pytest.raises(DependencyError) as info:
        get_backend("tensorrt", require=False).load(engine)
    message = str(info.value)
    assert info.value.exit_code == 3
    assert "Built for: TensorRT 10.3.0.30, GPU Orin (compute capability 8.7)" in message
    assert "This machine: TensorRT " in message and str(engine) in message
    if _no_tensorrt():
        assert "This machine: TensorRT not installed" in message


def test_tampered_unsigned_or_future_engines_are_exit_4(tmp_path):
    engine = _engine(tmp_path / "a")
    engine.write_bytes(engine.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError, match="does not match the sha256"):
        check_engine(engine, Machine("10.3.0", "Orin", "8.7"))
    with pytest.raises(IntegrityError, match="without its sidecar"):
        check_engine(_engine(tmp_path / "b", None), Machine("10.3.0", "Orin", "8.7"))
    with pytest.raises(IntegrityError, match="newer than this edgetransfer reads"):
        check_engine(_engine(tmp_path / "c", {**RECORD, "schema": 99}), Machine("10.3.0", "Orin", "8.7"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / SIDECAR_FILE).write_text("{not json")
    with pytest.raises(IntegrityError, match="unreadable engine sidecar"):
        check_engine(tmp_path / "d" / "model.engine", Machine("10.3.0", "Orin", "8.7"))
    assert check_engine(_engine(tmp_path / "ok"), Machine("10.3.0", "Orin", "8.7"))["gpu"] == "Orin"


def test_validate_refuses_an_engine_built_elsewhere_before_loading_it(jetson_run, tmp_path):
    run = _copy(jetson_run, tmp_path / "run")
    out = run / "jetson-orin-nano"
    shutil.copytree(jetson_run / "jetson-orin-nano", out)
    _engine(out)
    (out / COMPILED_FILE).write_text(json.dumps({"artifact": "model.engine", "backend": "tensorrt",
                                                 "source": INT8_FILE, "source_sha256": sha256_file(out / INT8_FILE)}))
    result = CliRunner().invoke(main, ["validate", str(run), "--target", "jetson-orin-nano"])
    assert result.exit_code == 3, result.output
    assert "Built for: TensorRT 10.3.0.30, GPU Orin" in result.output.replace("\n", "")
    assert not (out / "parity.json").exists()

    quantized = out / INT8_FILE  # a re-quantized model makes the engine stale: exit 2, recompile
    model = onnx.load(str(quantized))
    helper.set_model_props(model, {"requantized": "yes"})
    onnx.save(model, str(quantized))
    result = CliRunner().invoke(main, ["validate", str(run), "--target", "jetson-orin-nano"])
    assert result.exit_code == 2 and "compiled from an earlier model.int8.onnx" in result.output.replace("\n", "")


# ---- on a machine with TensorRT and a GPU --------------------------------------------------------

def test_build_and_validate_a_real_engine(jetson_run, tmp_path):
    """Builds with TensorRT's API for a target made from this machine's own GPU and validates it."""
    if _no_tensorrt():
        pytest.skip("TensorRT is not installed here (PyPI has no real wheel for this machine): "
                    "engines are built on the device from the kit")
    from edgetransfer.backends.tensorrt.sidecar import this_machine
    from edgetransfer.validate import validate

    here = this_machine()
    if here.gpu is None:
        pytest.skip("no CUDA GPU visible: a TensorRT engine needs one")
    run = _copy(jetson_run, tmp_path / "run")
    shutil.copytree(jetson_run / "jetson-orin-nano", run / "jetson-orin-nano")
    local = dataclasses.replace(ORIN, tensorrt=dataclasses.replace(
        ORIN.tensorrt, tensorrt=".".join(here.tensorrt.split(".")[:2]), compute_capability=here.compute_capability))
    engine = compile_run(run, local)
    record = json.loads((engine.parent / SIDECAR_FILE).read_text())
    assert record["gpu"] == here.gpu and record["engine_sha256"] == sha256_file(engine)
    assert (engine.parent / "timing.cache").stat().st_size > 0
    report = validate(run, target=local)
    compiler = next(p for p in report.pairs if p.pair.startswith("compiler fidelity"))
    assert compiler.agreement >= 0.9
