"""INT8 quantization on real models with real tools (ONNX Runtime, NNCF): no mocks.

One tiny CNN (Conv+BN+ReLU ×3, global average pool, Linear) is trained for a few steps on images
whose class is a bright quadrant in one colour channel, and exported like the project exports
(torch.onnx dynamo, opset 18, dynamic batch, metadata). Two quantization-hostile variants are made
from it by editing weights so that the fp32 outputs do not change at all:

* activation outlier: one output channel of conv2 is a constant 1e4 that conv3 ignores, so a
  per-tensor activation scale for conv3's input rounds every informative channel to zero;
* weight outlier: conv2 gets one huge weight on an input channel that is always zero, so a
  per-tensor weight scale rounds all its other weights to zero.

Both collapse INT8 accuracy to chance; the accuracy budget must find the one layer to keep in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from edgetransfer.errors import DependencyError, UsageError
from edgetransfer.quantize import QUANTIZERS, TOP1, Metric, OnnxRuntimeQuantizer, QuantizationReport, quantize_model
from edgetransfer.targets import CalibrationPreset, GateSpec, Quantization, load_target

CLASSES = ["top_left_r", "top_right_g", "bottom_left_b", "bottom_right_r"]
SIZE = 16
PRESET = CalibrationPreset(name="test", samples=64)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise images; class c brightens quadrant c of colour channel c % 3 — separable, not trivial."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    x = rng.normal(0.0, 0.5, (n, 3, SIZE, SIZE)).astype(np.float32)
    half = SIZE // 2
    for i, c in enumerate(labels):
        row, col = divmod(int(c), 2)
        x[i, c % 3, row * half:(row + 1) * half, col * half:(col + 1) * half] += 1.5
    return x, labels


@pytest.fixture(scope="module")
def data() -> dict[str, object]:
    x_train, y_train = synthetic(512, seed=0)
    x_val, y_val = synthetic(256, seed=1)
    return {"train": (x_train, y_train), "calibration": [x_train[:32], x_train[32:64]], "validation": (x_val, y_val)}


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, data) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class TinyCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(block(3, 8), nn.MaxPool2d(2), block(8, 16), nn.MaxPool2d(2), block(16, 16))
            self.head = nn.Linear(16, len(CLASSES))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean((2, 3)))

    model = TinyCNN()
    x, y = (torch.from_numpy(a) for a in data["train"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(30):
        idx = torch.from_numpy(rng.integers(0, len(x), 32))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    program = torch.onnx.export(model, (torch.randn(2, 3, SIZE, SIZE),), input_names=["input"], output_names=["logits"],
                                opset_version=18, dynamo=True, external_data=False, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    proto = program.model_proto
    for key, value in {"edgetransfer.classes": json.dumps(CLASSES),
                       "edgetransfer.input_spec": json.dumps({"height": SIZE, "width": SIZE})}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = tmp_path_factory.mktemp("models") / "model.onnx"
    onnx.save_model(proto, str(path))
    return path


def convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def edited(fp32_onnx: Path, name: str, edit) -> Path:
    """A copy of the model whose conv weights `edit(weights, convs)` changes in place."""
    model = onnx.load(str(fp32_onnx))
    inits = {i.name: i for i in model.graph.initializer}
    arrays = {name: numpy_helper.to_array(init).copy() for name, init in inits.items()}
    edit(arrays, convs(model))
    for key, array in arrays.items():
        inits[key].CopyFrom(numpy_helper.from_array(array, key))
    path = fp32_onnx.parent / name
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def activation_outlier(fp32_onnx) -> Path:
    def edit(w, c):
        conv2, conv3 = c[1], c[2]
        w[conv2.input[1]][0] = 0.0
        w[conv2.input[2]][0] = 1e4   # channel 0 of conv2 is a constant 1e4 ...
        w[conv3.input[1]][:, 0] = 0.0  # ... that conv3 ignores: fp32 outputs are unchanged
    return edited(fp32_onnx, "activation_outlier.onnx", edit)


@pytest.fixture(scope="module")
def weight_outlier(fp32_onnx) -> Path:
    def edit(w, c):
        conv1, conv2 = c[0], c[1]
        w[conv1.input[1]][0] = 0.0
        w[conv1.input[2]][0] = 0.0   # channel 0 of conv1 is always 0 after ReLU ...
        w2 = w[conv2.input[1]]
        w2[0, 0, 1, 1] = 1000 * np.abs(w2).max()  # ... so this huge weight of conv2 never contributes
    return edited(fp32_onnx, "weight_outlier.onnx", edit)


@pytest.fixture(scope="module")
def agreement_outlier(fp32_onnx) -> Path:
    """A milder weight outlier (90x, per-tensor): INT8 flips a few predictions both ways, so the accuracy
    drop is within the 0.5 point budget while top-1 agreement with fp32 is below the 0.99 gate."""
    def edit(w, c):
        conv1, conv2 = c[0], c[1]
        w[conv1.input[1]][0] = 0.0
        w[conv1.input[2]][0] = 0.0
        w2 = w[conv2.input[1]]
        w2[0, 0, 1, 1] = 90 * np.abs(w2).max()
    return edited(fp32_onnx, "agreement_outlier.onnx", edit)


@pytest.fixture(scope="module")
def two_culprits(fp32_onnx) -> Path:
    """Both outliers at once: conv2's weights (per-tensor) and conv3's input activations."""
    def edit(w, c):
        conv1, conv2, conv3 = c
        w[conv1.input[1]][0] = 0.0
        w[conv1.input[2]][0] = 0.0
        w2 = w[conv2.input[1]]
        w2[0, 0, 1, 1] = 1000 * np.abs(w2).max()
        w2[1] = 0.0
        w[conv2.input[2]][1] = 1e4
        w[conv3.input[1]][:, 1] = 0.0
    return edited(fp32_onnx, "two_culprits.onnx", edit)


# ---- helpers --------------------------------------------------------------------------------------

def logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def run(fp32: Path, out: Path, data, gates: GateSpec | None = None, **scheme) -> QuantizationReport:
    return quantize_model(fp32, out, scheme=Quantization(**scheme), preset=PRESET,
                          calibration=data["calibration"], validation=data["validation"], gates=gates)


#: what the x86/OpenVINO INT8 profiles gate on (validate enforces them on the test images)
PROFILE_GATES = load_target("x86-onnxruntime").gates.quantization


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def reads_dequantized(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    made_by = producers(model)
    return any(i in made_by and made_by[i].op_type == "DequantizeLinear" for i in node.input)


def weight_scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Conv/Gemm name → the scale of the DequantizeLinear that feeds its weight."""
    inits = {i.name: i for i in model.graph.initializer}
    made_by = producers(model)
    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[1] in made_by:
            dq = made_by[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            out[node.name] = numpy_helper.to_array(inits[dq.input[1]])
    return out


def check_fallback_report(r: QuantizationReport, layers: int) -> None:
    """The rows tell one consistent story: each layer saves what it says, ending within the budget."""
    assert r.within_budget and r.drop <= r.budget
    assert [row["layer"] for row in r.fallback] == r.excluded_layers
    previous = round((r.fp32_val_accuracy - r.candidates[0]["val_accuracy"]) * 100, 6)
    for row in r.fallback:
        assert row["drop_after"] <= previous
        assert row["saved_points"] == pytest.approx(previous - row["drop_after"])
        previous = row["drop_after"]
    assert r.fallback[-1]["drop_after"] == pytest.approx(r.drop)
    assert r.fallback[-1]["val_accuracy_after"] == r.int8_val_accuracy
    assert r.quantized_layers == layers - len(r.excluded_layers)
    json.dumps(r.to_dict(), allow_nan=False)


# ---- plain quantization -------------------------------------------------------------------------

def test_onnxruntime_asymmetric_per_channel_keeps_accuracy(fp32_onnx, data, tmp_path):
    out = tmp_path / "int8" / "model.int8.onnx"
    r = run(fp32_onnx, out, data, quantizer="onnxruntime", activations="asymmetric", weights="per_channel")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.int8.onnx"]  # one file, no temporaries
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # per-channel: one scale per output channel of every conv, and for the classifier's weights
    scales = weight_scales(model)
    assert len(scales) == 4
    for node in convs(model):
        assert scales[node.name].shape == (numpy_helper.to_array(
            {i.name: i for i in model.graph.initializer}[producers(model)[node.input[1]].input[0]]).shape[0],)
    assert {p.key: p.value for p in model.metadata_props} == \
        {p.key: p.value for p in onnx.load(str(fp32_onnx)).metadata_props}

    x, y = data["validation"]
    fp32, int8 = logits(fp32_onnx, x), logits(out, x)
    assert (fp32.argmax(1) == y).mean() >= 0.95  # the model learnt the task
    assert r.fp32_val_accuracy == (fp32.argmax(1) == y).mean()
    assert r.int8_val_accuracy == (int8.argmax(1) == y).mean()
    assert r.drop <= 1.0 and r.within_budget and not r.fallback and r.excluded_layers == []
    assert len(np.unique(int8.argmax(1))) == len(CLASSES) and int8.std(0).min() > 0.1  # not a constant model
    assert np.corrcoef(fp32.ravel(), int8.ravel())[0, 1] > 0.99
    assert r.quantizer == "onnxruntime" and r.quantized_layers == 4
    assert r.candidates == [{"quantizer": "onnxruntime", "val_accuracy": r.int8_val_accuracy, "agreement": 1.0,
                             "seconds": r.candidates[0]["seconds"]}]


@pytest.mark.parametrize("quantizer", ["onnxruntime", "nncf"])
def test_symmetric_scheme_is_signed_int8_with_zero_point_0(fp32_onnx, data, tmp_path, quantizer):
    """TensorRT's rule: every Q/DQ is INT8 with zero point 0 (NNCF's UINT8 post-ReLU ones are converted)."""
    out = tmp_path / "sym.onnx"
    r = run(fp32_onnx, out, data, quantizer=quantizer, activations="symmetric")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    inits = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert any(n.op_type == "QuantizeLinear" for n in qdq)
    for node in qdq:
        zero_point = inits[node.input[2]]
        assert not numpy_helper.to_array(zero_point).any(), node.name
        # INT8 everywhere; INT32 only for biases (a DequantizeLinear of a constant), as TensorRT expects
        bias = node.op_type == "DequantizeLinear" and node.input[0] in inits
        assert zero_point.data_type == TensorProto.INT8 or (bias and zero_point.data_type == TensorProto.INT32), \
            node.name
    assert all(s.ndim == 1 and s.size > 1 for s in weight_scales(model).values())  # per_channel (the default)
    assert r.drop <= 1.0 and r.within_budget
    assert len(np.unique(logits(out, data["validation"][0]).argmax(1))) == len(CLASSES)


def test_auto_tries_every_quantizer_and_keeps_the_best(fp32_onnx, data, tmp_path):
    r = run(fp32_onnx, tmp_path / "auto.onnx", data, quantizer="auto")
    assert [c["quantizer"] for c in r.candidates] == list(QUANTIZERS)
    # the highest agreement with fp32 first, then accuracy
    best = max(r.candidates, key=lambda c: (c["agreement"], c["val_accuracy"]))
    assert r.quantizer == best["quantizer"] and r.int8_val_accuracy == best["val_accuracy"]
    assert all(c["seconds"] > 0 and "error" not in c for c in r.candidates)
    assert json.loads(json.dumps(r.to_dict())) == r.to_dict()


class _Unavailable(OnnxRuntimeQuantizer):
    """A real quantizer that honestly says it cannot run here."""

    name = "onnxruntime"

    def available(self) -> str | None:
        return "the ONNX Runtime build here lacks quantization (pip install onnxruntime)"


def test_unavailable_named_quantizer_is_a_dependency_error(fp32_onnx, data, tmp_path, monkeypatch):
    monkeypatch.setitem(QUANTIZERS, "onnxruntime", _Unavailable)
    with pytest.raises(DependencyError, match="pip install onnxruntime") as err:
        run(fp32_onnx, tmp_path / "x.onnx", data, quantizer="onnxruntime")
    assert err.value.exit_code == 3
    assert not (tmp_path / "x.onnx").exists()
    # auto skips what is unavailable and uses the rest
    monkeypatch.delitem(QUANTIZERS, "nncf")
    with pytest.raises(DependencyError, match="no quantizer is usable"):
        run(fp32_onnx, tmp_path / "x.onnx", data, quantizer="auto")


def test_bad_inputs_are_usage_errors(fp32_onnx, data, tmp_path):
    scheme = Quantization(quantizer="onnxruntime")
    x, y = data["validation"]
    with pytest.raises(UsageError, match="calibration"):
        quantize_model(fp32_onnx, tmp_path / "q.onnx", scheme=scheme, preset=PRESET, calibration=[], validation=(x, y))
    with pytest.raises(UsageError, match="validation"):
        quantize_model(fp32_onnx, tmp_path / "q.onnx", scheme=scheme, preset=PRESET,
                       calibration=data["calibration"], validation=(x, y[:-1]))
    with pytest.raises(UsageError, match="not found"):
        quantize_model(tmp_path / "missing.onnx", tmp_path / "q.onnx", scheme=scheme, preset=PRESET,
                       calibration=data["calibration"], validation=(x, y))


# ---- the accuracy budget ------------------------------------------------------------------------

def test_fallback_keeps_the_weight_outlier_layer_in_fp32(weight_outlier, data, tmp_path):
    """Per-tensor weights: conv2's one huge weight zeroes the rest; only conv2 needs fp32."""
    conv2 = convs(onnx.load(str(weight_outlier)))[1].name
    plain = run(weight_outlier, tmp_path / "plain.onnx", data, quantizer="onnxruntime", weights="per_tensor",
                fallback=False)
    assert plain.drop > 30 and not plain.within_budget and plain.fallback == []
    assert (tmp_path / "plain.onnx").exists()  # written even when over budget: the caller gates on the report
    assert all(s.size == 1 for s in weight_scales(onnx.load(str(tmp_path / "plain.onnx"))).values())  # per_tensor

    out = tmp_path / "fallback.onnx"
    r = run(weight_outlier, out, data, quantizer="onnxruntime", weights="per_tensor", max_drop=0.5)
    assert r.excluded_layers == [conv2]
    check_fallback_report(r, layers=4)
    assert r.fallback[0]["sensitivity"] > 0.9 and r.fallback[0]["saved_points"] > 30
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert reads_dequantized(model, node) == (node.name != conv2), node.name


@pytest.mark.parametrize("quantizer", ["onnxruntime", "nncf"])
def test_fallback_keeps_the_consumer_of_an_activation_outlier_in_fp32(activation_outlier, data, tmp_path, quantizer):
    """conv3 reads the tensor with the outlier channel: in fp32 (on fp32 inputs) it restores accuracy.

    For ONNX Runtime this needs more than `nodes_to_exclude`: conv2 still quantizes its own output,
    so conv3's input is rewired past the Q/DQ pairs (through fp32 twins of MaxPool and the Relu that
    ORT folded into a Q).
    """
    conv3 = convs(onnx.load(str(activation_outlier)))[2].name
    out = tmp_path / "fallback.onnx"
    r = run(activation_outlier, out, data, quantizer=quantizer, max_drop=0.5, max_fallback_layers=2)
    assert r.candidates[0]["val_accuracy"] < 0.5  # plain INT8 is near chance
    assert r.excluded_layers == [conv3]
    check_fallback_report(r, layers=4)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    node = next(n for n in model.graph.node if n.name == conv3)
    assert not reads_dequantized(model, node)
    assert {p.key: p.value for p in model.metadata_props} == \
        {p.key: p.value for p in onnx.load(str(activation_outlier)).metadata_props}
    x, y = data["validation"]
    assert (logits(out, x).argmax(1) == y).mean() == r.int8_val_accuracy


def test_fallback_finds_two_independent_culprits(two_culprits, data, tmp_path):
    """Keeping either culprit alone in fp32 changes nothing (the other still wrecks the output), so a
    leave-one-out ranking sees no signal; ranking each layer by the error it brings alone finds both."""
    conv2, conv3 = (n.name for n in convs(onnx.load(str(two_culprits)))[1:])
    r = run(two_culprits, tmp_path / "q.onnx", data, quantizer="onnxruntime", weights="per_tensor",
            max_fallback_layers=3)
    assert r.candidates[0]["val_accuracy"] < 0.5
    assert sorted(r.excluded_layers) == sorted([conv2, conv3])
    # shares of the summed added error: the two culprits hold nearly all of it, none exceeds 1
    assert all(row["sensitivity"] > 0.3 for row in r.fallback) and sum(row["sensitivity"] for row in r.fallback) > 0.9
    shares = [layer["share"] for layer in r.sensitivity["layers"]]
    assert all(0.0 <= v <= 1.0 for v in shares) and sum(shares) <= 1.0 + 1e-5  # rounded to 6 places
    assert r.within_budget and r.quantized_layers == 2
    assert r.fallback[-1]["drop_after"] == r.drop


def test_fallback_stops_at_max_fallback_layers(weight_outlier, data, tmp_path):
    r = run(weight_outlier, tmp_path / "q.onnx", data, quantizer="onnxruntime", weights="per_tensor",
            max_fallback_layers=0)
    assert r.fallback == [] and r.excluded_layers == [] and not r.within_budget


# ---- every gate, not only the budget -----------------------------------------------------------------

def test_search_keeps_layers_in_fp32_until_the_agreement_gate_passes(agreement_outlier, data, tmp_path):
    """The issue: drop within the budget, no layer kept, then `validate` failed on agreement. The
    search must aim at the profile's agreement gate as well, measured on validation + calibration."""
    assert (PROFILE_GATES.min_agreement, PROFILE_GATES.max_accuracy_drop) == (0.99, 0.5)
    conv2 = convs(onnx.load(str(agreement_outlier)))[1].name
    x_val, _ = data["validation"]
    calibration_images = sum(len(b) for b in data["calibration"])  # from train: none is a val image

    budget_only = run(agreement_outlier, tmp_path / "budget.onnx", data, quantizer="onnxruntime",
                      weights="per_tensor")
    assert budget_only.within_budget and budget_only.fallback == []  # the old behaviour: nothing to do
    assert budget_only.min_agreement is None and budget_only.within_gates
    assert budget_only.agreement < 0.99  # ... but it would fail validate's agreement gate

    out = tmp_path / "gated.onnx"
    r = run(agreement_outlier, out, data, gates=PROFILE_GATES, quantizer="onnxruntime", weights="per_tensor")
    assert r.candidates[0]["agreement"] == budget_only.agreement < r.min_agreement == 0.99
    assert r.agreement_samples == len(x_val) + calibration_images
    assert r.excluded_layers == [conv2] and r.fallback[0]["agreement_after"] == r.agreement >= 0.99
    assert r.within_budget and r.within_gates and r.advice == []
    check_fallback_report(r, layers=4)
    # the report's agreement is what the written model does on those images
    images = np.concatenate([x_val, *data["calibration"]])
    fp32, int8 = logits(agreement_outlier, images), logits(out, images)
    assert r.agreement == pytest.approx((fp32.argmax(1) == int8.argmax(1)).mean())
    assert json.loads(json.dumps(r.to_dict(), allow_nan=False))["within_gates"] is True


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count half), by brute force."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def test_the_search_judges_by_the_metric_it_is_given(agreement_outlier, data, tmp_path):
    """The budget search is not tied to labels-and-argmax: a detector's metric (AUROC of one class's
    margin, the same side of zero as fp32) is what the report's figures and the gates measure."""
    def margin(out: np.ndarray) -> np.ndarray:
        return out[:, 0] - np.delete(out, 0, axis=1).max(1)

    metric = Metric("class-0 auroc", score=lambda out, labels: _auroc(margin(out), labels == 0),
                    same=lambda ref, cand: (margin(ref) > 0) == (margin(cand) > 0))
    out = tmp_path / "q.onnx"
    r = quantize_model(agreement_outlier, out, scheme=Quantization(quantizer="onnxruntime", weights="per_tensor"),
                       preset=PRESET, calibration=data["calibration"], validation=data["validation"],
                       gates=PROFILE_GATES, metric=metric)
    x_val, y_val = data["validation"]
    images = np.concatenate([x_val, *data["calibration"]])
    fp32, int8 = logits(agreement_outlier, images), logits(out, images)
    assert r.metric == "class-0 auroc"
    assert r.fp32_val_accuracy == pytest.approx(_auroc(margin(fp32[:len(x_val)]), y_val == 0))
    assert r.int8_val_accuracy == pytest.approx(_auroc(margin(int8[:len(x_val)]), y_val == 0))
    assert r.agreement == pytest.approx(((margin(fp32) > 0) == (margin(int8) > 0)).mean())
    # ... which on these images is not the top-1 agreement, so the line above could fail
    assert r.agreement != pytest.approx((fp32.argmax(1) == int8.argmax(1)).mean())
    assert TOP1.name == "accuracy" and run(agreement_outlier, tmp_path / "t.onnx", data, quantizer="onnxruntime",
                                           weights="per_tensor").metric == "accuracy"


def test_validation_images_in_the_calibration_set_count_once(fp32_onnx, data, tmp_path):
    x_val, y_val = data["validation"]
    r = quantize_model(fp32_onnx, tmp_path / "q.onnx", scheme=Quantization(quantizer="onnxruntime"), preset=PRESET,
                       calibration=[x_val[:40], data["calibration"][0]], validation=(x_val, y_val),
                       gates=PROFILE_GATES)
    assert r.agreement_samples == len(x_val) + len(data["calibration"][0])


def test_a_missed_gate_says_what_to_try_next(agreement_outlier, data, tmp_path):
    r = run(agreement_outlier, tmp_path / "q.onnx", data, gates=PROFILE_GATES, quantizer="onnxruntime",
            weights="per_tensor", max_fallback_layers=0)
    assert r.within_budget and not r.within_gates and r.excluded_layers == []
    advice = "\n".join(r.advice)
    assert "--calib percentile" in advice and "--calib entropy" in advice
    assert "--quantizer nncf" in advice
    assert "--max-fallback-layers" in advice and "per_channel" in advice
    assert json.loads(json.dumps(r.to_dict()))["advice"] == r.advice


def test_the_stricter_drop_limit_of_budget_and_gate_is_the_budget(fp32_onnx, data, tmp_path):
    r = run(fp32_onnx, tmp_path / "q.onnx", data, gates=GateSpec(min_agreement=None, max_accuracy_drop=0.25),
            quantizer="onnxruntime", max_drop=2.0)
    assert r.budget == 0.25 and r.min_agreement is None


# ---- the target's compiler in the search ------------------------------------------------------------

def openvino_logits(qdq: Path, x: np.ndarray, tmp: Path) -> np.ndarray:
    """What `edgetransfer compile` + the OpenVINO runner make of a QDQ file, measured independently."""
    from edgetransfer.backends import get_backend

    backend, target = get_backend("openvino"), load_target("intel-cpu")
    with backend.load(backend.compile(qdq, target, tmp), target) as runner:
        return np.concatenate([runner.infer(x[i:i + target.batch.max]) for i in range(0, len(x), target.batch.max)])


def test_compiler_in_the_loop_measures_the_compiled_model_it_keeps(fp32_onnx, data, tmp_path):
    from edgetransfer.stages import compiler_check

    pytest.importorskip("openvino", reason="the intel-cpu compiler is OpenVINO")
    target = load_target("intel-cpu")
    check = compiler_check(target)
    assert check is not None and check.name == "openvino CPU"
    out = tmp_path / "q.onnx"
    r = quantize_model(fp32_onnx, out, scheme=target.quantization, preset=PRESET, calibration=data["calibration"],
                       validation=data["validation"], gates=target.gates.quantization, compiler=check)
    assert r.compiler is not None and r.compiler["compiler"] == "openvino CPU"
    assert r.compiler["samples"] == r.agreement_samples
    assert all("compiler_min_cosine" in c for c in r.candidates)
    # the figures are what OpenVINO does with the written file, on the same images
    images = np.concatenate([data["validation"][0], *data["calibration"]])
    qdq, compiled = logits(out, images), openvino_logits(out, images, tmp_path / "ov")
    assert r.compiler["agreement"] == pytest.approx((qdq.argmax(1) == compiled.argmax(1)).mean())
    cosine = (qdq * compiled).sum(1) / np.linalg.norm(qdq, axis=1) / np.linalg.norm(compiled, axis=1)
    assert r.compiler["min_cosine"] == pytest.approx(cosine.min(), abs=1e-6)
    assert r.within_gates == (not r.compiler["failures"] and r.within_budget and r.agreement >= r.min_agreement)


def test_search_keeps_layers_in_fp32_until_the_compiler_gate_passes(weight_outlier, data, tmp_path):
    """A compiler that runs the file unlike ONNX Runtime (here: as fp32, i.e. ignoring every Q/DQ) is a
    gate miss the quantization gates alone never see; the fallback must act on it."""
    from edgetransfer.parity import Gates
    from edgetransfer.quantize import CompilerCheck, onnx_logits

    as_fp32 = CompilerCheck(name="fp32 stand-in", gates=Gates(min_agreement=None, max_abs_diff=None, min_cosine=None),
                            run=lambda qdq, arrays: onnx_logits(weight_outlier, arrays))
    scheme = {"quantizer": "onnxruntime", "weights": "per_tensor"}
    first = quantize_model(weight_outlier, tmp_path / "a.onnx", scheme=Quantization(**scheme, max_fallback_layers=0),
                           preset=PRESET, calibration=data["calibration"], validation=data["validation"],
                           compiler=as_fp32)
    assert first.compiler["failures"] == [] and first.compiler["min_cosine"] < 0.9
    strict = CompilerCheck(name="fp32 stand-in", gates=Gates(min_agreement=None, max_abs_diff=None, min_cosine=0.9), run=as_fp32.run)
    r = quantize_model(weight_outlier, tmp_path / "b.onnx", scheme=Quantization(**scheme, max_drop=100.0),
                       preset=PRESET, calibration=data["calibration"], validation=data["validation"], compiler=strict)
    assert r.fallback and r.fallback[0]["compiler_min_cosine_after"] > first.compiler["min_cosine"]
    assert r.compiler["min_cosine"] >= 0.9 and r.compiler["failures"] == [] and r.within_gates
    missed = quantize_model(weight_outlier, tmp_path / "c.onnx", scheme=Quantization(**scheme, max_drop=100.0,
                            max_fallback_layers=0), preset=PRESET, calibration=data["calibration"],
                            validation=data["validation"], compiler=strict)
    assert not missed.within_gates and missed.compiler["failures"]
    assert any("fp32 stand-in runs this QDQ file differently" in line for line in missed.advice)


@pytest.mark.parametrize("quantizer,bias", [("nncf", "int32"), ("onnxruntime", "float")])
def test_every_runtime_path_computes_the_same_qdq_file(fp32_onnx, data, tmp_path, quantizer, bias):
    """Float biases are rounded onto the integer accumulator grid (s_x · s_w): ONNX Runtime's fused
    integer kernels round a float bias to int32 there, the file run op by op does not, and on the
    grid both are the same number. NNCF always writes float biases; ONNX Runtime's quantizer does
    with `bias: float` (the Jetson profiles)."""
    from onnx import numpy_helper

    out = tmp_path / "q.onnx"
    run(fp32_onnx, out, data, quantizer=quantizer, activations="symmetric", bias=bias)
    model = onnx.load(out)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    made = {o: n for n in model.graph.node for o in n.output}

    def dequantized(tensor: str) -> onnx.NodeProto:
        node = made[tensor]
        while node.op_type == "MaxPool":  # NNCF quantizes before a pooling layer, ONNX Runtime after it
            node = made[node.input[0]]
        assert node.op_type == "DequantizeLinear", tensor
        return node

    checked = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) == 3 and node.input[2] in inits:
            s_x, s_w = (inits[dequantized(t).input[1]].astype(np.float64) for t in node.input[:2])
            steps = inits[node.input[2]].astype(np.float64) / (s_x * s_w)
            assert np.allclose(steps, np.rint(steps), atol=1e-3), node.name
            checked += 1
    assert checked == 4  # three convolutions and the linear head
    x = data["validation"][0]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    exact = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    fused = logits(out, x)
    assert np.linalg.norm(fused - exact) / np.linalg.norm(exact) < 1e-4


@pytest.mark.parametrize("quantizer", ["onnxruntime", "nncf"])
def test_float_ops_read_float_inputs_whichever_tool_quantized(residual_onnx, tmp_path, quantizer):
    """`float_ops: [Add]`: every residual Add adds float tensors (no DequantizeLinear feeds it) while
    the convolutions stay INT8. NNCF does so itself; ONNX Runtime's quantizer puts the neighbouring
    convolutions' Q→DQ pairs on the Add's inputs, which the graph edit after it takes off."""
    fp32, calibration, x = residual_onnx
    out = tmp_path / "q.onnx"
    quantize_model(fp32, out, scheme=Quantization(quantizer=quantizer, activations="symmetric", float_ops=("Add",)),
                   preset=PRESET, calibration=calibration, validation=(x, np.zeros(len(x), dtype=np.int64)))
    model = onnx.load(out)
    made = {o: n for n in model.graph.node for o in n.output}
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert len(adds) == 4
    for add in adds:
        assert not any(t in made and made[t].op_type == "DequantizeLinear" for t in add.input), add.name
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 13 and all(made[n.input[0]].op_type == "DequantizeLinear" for n in convs), \
        "every convolution still reads INT8 activations"
    fp, q = logits(fp32, x), logits(out, x)
    assert 1e-4 < np.linalg.norm(fp - q) / np.linalg.norm(fp) < 0.05


@pytest.mark.parametrize("quantizer", ["nncf", "onnxruntime"])
def test_bias_correction_off_changes_bias_values_not_the_graph(fp32_onnx, data, tmp_path, quantizer):
    """`bias_correction=False` (select's timing-only models): NNCF skips its bias correction, which moves
    biases and nothing else; ONNX Runtime's quantizer has none, so its file is byte for byte the same."""
    scheme = Quantization(quantizer=quantizer, activations="symmetric")
    files = {}
    for corrected in (True, False):
        files[corrected] = tmp_path / f"q-{corrected}.onnx"
        QUANTIZERS[quantizer]().quantize(fp32_onnx, files[corrected], scheme=scheme, preset=PRESET,
                                         calibration=data["calibration"], bias_correction=corrected)
    on, off = (onnx.load(str(files[c])) for c in (True, False))

    def wiring(m: onnx.ModelProto) -> list:
        return [(n.op_type, list(n.input), list(n.output), [str(a) for a in n.attribute]) for n in m.graph.node]

    assert wiring(on) == wiring(off)
    a, b = ({i.name: numpy_helper.to_array(i) for i in m.graph.initializer} for m in (on, off))
    assert a.keys() == b.keys()
    biases = {n.input[2] for n in on.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) == 3}
    moved = {k for k in a if not np.array_equal(a[k], b[k])}
    if quantizer == "nncf":
        assert moved and moved <= biases, moved - biases
    else:
        assert not moved


# ---- what the search says when it misses ---------------------------------------------------------

def test_advice_names_each_alternative_once_and_quotes_what_was_measured():
    """The advice once read "`--calib entropy` (or --calib entropy)" and "used: percentile, percentile"."""
    from edgetransfer.quantize.search import quantization_advice

    report = QuantizationReport(quantizer="onnxruntime", candidates=[], fp32_val_accuracy=0.9, int8_val_accuracy=0.88,
                                drop=2.0, budget=0.5, within_budget=False, fallback=[], excluded_layers=[],
                                quantized_layers=10, agreement=0.97, agreement_samples=400, min_agreement=0.99,
                                within_gates=False, validation_samples=400)
    preset = CalibrationPreset(name="percentile", method="percentile")
    plain = quantization_advice(report, scheme=Quantization(quantizer="onnxruntime"), preset=preset,
                                tried=["onnxruntime"], validation_samples=400)
    text = " ".join(plain)
    assert text.count("--calib entropy") == 1
    assert "--calib percentile" not in text and "percentile, percentile" not in text
    assert len(plain) == len(set(plain))
    measured = [{"try": "`--quantizer nncf`", "meets_gates": True, "drop": 0.25, "agreement": 0.995, "min_cosine": 0.99},
                {"try": "`--calib entropy`", "meets_gates": False, "drop": 1.5, "agreement": 0.98, "min_cosine": 0.9}]
    advice = quantization_advice(report, scheme=Quantization(quantizer="onnxruntime"), preset=preset,
                                 tried=["onnxruntime"], validation_samples=400, measured=measured)
    assert advice[0].startswith("`--quantizer nncf`: measured drop 0.25 points, agreement 0.9950")
    assert "meets every gate" in advice[0] and "still misses a gate" in advice[1]
    # a measured alternative is not repeated as an unmeasured suggestion
    assert not any(a.startswith(("calibrate differently", "another quantizer")) for a in advice)
