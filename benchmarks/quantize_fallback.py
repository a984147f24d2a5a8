"""INT8 accuracy on quantization-hostile CNNs: plain INT8, edgetransfer's fp32 fallback, and NNCF's accuracy control.

    python benchmarks/quantize_fallback.py [--out results.json] [--nncf-backend auto|onnx|openvino]

What it measures. Three small CNNs are trained for a few seconds on synthetic images (class c
brightens quadrant c of colour channel c % 3), exported the way the project exports (torch.onnx
dynamo, opset 18), then edited so that a per-tensor INT8 grid wrecks them while the outlier never
reaches the fp32 outputs ("fp32 acc" is that of the edited model):

* ``activation-outlier``: 3 convs; conv2's channel 0 is a constant 1e4 that conv3 ignores, so the
  per-tensor scale of conv3's input rounds every informative channel to zero (culprit: conv3);
* ``weight-outlier``: 3 convs, per-tensor weights; conv2 holds one huge weight on an input channel
  that is always zero, so its weight scale rounds all other weights to zero (culprit: conv2);
* ``two-outliers-8conv``: 8 convs, per-tensor weights, ~600 validation images, *both* defects in
  two unrelated places (a weight outlier in conv3, an activation outlier read by conv7). Each one
  alone collapses accuracy, so keeping either culprit alone in fp32 changes nothing: a ranking that
  reverts one layer at a time ("remove one layer, see what it saves") sees no signal there.

For each model, on the same machine in one run: plain INT8 with each quantizer (ONNX Runtime, NNCF;
no fallback), edgetransfer's ``quantize_model`` with its accuracy budget (keep the most sensitive
layers in fp32, ranked leave-one-in) for both quantizers, and ``nncf.quantize_with_accuracy_control``
(NNCF's own greedy reverter, ranked leave-one-out) with the same quantization parameters, the same
calibration batches, the same validation images, ranking on the same 300 images, and
``max_drop`` equal to the same budget (0.5 accuracy points = 0.005 absolute). NNCF runs on its
OpenVINO backend (its ONNX backend, used when OpenVINO is missing or with ``--nncf-backend onnx``,
has only the metric ranking) with both of its rankings: "metric" (validation_fn returns the
accuracy alone, as NNCF's documentation does: each revert is scored by the accuracy it gives) and
"nmse" (validation_fn also returns each image's logits: each revert is scored by the normalized MSE
of the outputs). As measured with NNCF 3.4.0, the nmse ranking reverts the group whose revert leaves
the *largest* error first (ascending sort, ``pop()`` from the end), so a lone culprit comes last.

Why. The README quotes these figures; this script is how anyone reproduces them. Everything is
seeded (torch, numpy), so two runs on one machine give the same accuracies and the same kept
layers; seconds are wall-clock for the quantization call alone (calibration, ranking, re-quantizing
and validation included; training and export excluded). Every accuracy is measured here on the CPU
on the model each method produced: in ONNX Runtime, or in OpenVINO for NNCF's OpenVINO-backend
result (NNCF's own logged metric is used only for the "int8 acc" of its rows: its fully quantized
intermediate model, which it does not return). "Layers kept fp32" counts the
Conv/Gemm/MatMul nodes that read no dequantized tensor; names are conv1..convN, fc in graph order.
Runs in 1 to 1.5 minutes on 2 CPU cores (about 15-30 s of it is training and exporting the models).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("EDGETRANSFER_PROGRESS", "0")  # no progress bars in a benchmark's output
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from edgetransfer.export import export_module  # noqa: E402
from edgetransfer.quantize import onnx_logits, quantize_model  # noqa: E402
from edgetransfer.spec import InputSpec  # noqa: E402
from edgetransfer.targets import CalibrationPreset, Quantization  # noqa: E402

SIZE = 16
NUM_CLASSES = 4
BUDGET = 0.5                 # accuracy points (edgetransfer's max_drop); NNCF gets BUDGET / 100 absolute
RANKING_SAMPLES = 300        # both rankers look at the same number of validation images
PRESET = CalibrationPreset(name="benchmark", samples=64)
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ---- data and models ---------------------------------------------------------------------------

def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise images; class c brightens quadrant c of colour channel c % 3 — separable, not trivial."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    x = rng.normal(0.0, 0.5, (n, 3, SIZE, SIZE)).astype(np.float32)
    half = SIZE // 2
    for i, c in enumerate(labels):
        row, col = divmod(int(c), 2)
        x[i, c % 3, row * half:(row + 1) * half, col * half:(col + 1) * half] += 1.5
    return x, labels.astype(np.int64)


def train_and_export(widths: list[int | str], x: np.ndarray, y: np.ndarray, steps: int, out: Path, seed: int) -> Path:
    """Conv-BN-ReLU blocks ("M" = 2x2 max pool), global average pool, Linear; a few Adam steps; ONNX export."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    cin = 3
    for w in widths:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, int(w), 3, padding=1, bias=False), nn.BatchNorm2d(int(w)), nn.ReLU()]
            cin = int(w)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(cin, NUM_CLASSES)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(t).mean((2, 3)))

    model = Net()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(xt), 32))
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_module(model, InputSpec(height=SIZE, width=SIZE), out)


def edit_weights(src: Path, dst: Path, edit: Callable[[dict[str, np.ndarray], list[onnx.NodeProto]], None]) -> Path:
    """A copy of `src` whose initializers `edit(arrays, convs)` changes in place (BN is folded: Conv has a bias)."""
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    arrays = {name: numpy_helper.to_array(init).copy() for name, init in inits.items()}
    edit(arrays, [n for n in model.graph.node if n.op_type == "Conv"])
    for key, array in arrays.items():
        inits[key].CopyFrom(numpy_helper.from_array(array, key))
    onnx.save_model(model, str(dst))
    return dst


def dead_channel(w: dict[str, np.ndarray], conv: onnx.NodeProto, channel: int) -> None:
    """Output `channel` of `conv` is 0 before ReLU, so always 0 after it."""
    w[conv.input[1]][channel] = 0.0
    w[conv.input[2]][channel] = 0.0


def weight_outlier(w: dict[str, np.ndarray], producer: onnx.NodeProto, conv: onnx.NodeProto, channel: int) -> None:
    """`producer`'s `channel` is always 0; `conv` gets a huge weight there that never contributes in fp32."""
    dead_channel(w, producer, channel)
    weights = w[conv.input[1]]
    weights[0, channel, 1, 1] = 1000 * np.abs(weights).max()


def activation_outlier(w: dict[str, np.ndarray], producer: onnx.NodeProto, consumer: onnx.NodeProto,
                       channel: int) -> None:
    """`producer`'s `channel` is a constant 1e4 that `consumer` ignores (its weights there are 0)."""
    w[producer.input[1]][channel] = 0.0
    w[producer.input[2]][channel] = 1e4
    w[consumer.input[1]][:, channel] = 0.0


@dataclass
class Case:
    name: str
    fp32: Path
    weights: str                                 # edgetransfer's Quantization.weights for this case
    calibration: list[np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    culprits: list[str]
    labels: dict[str, str] = field(default_factory=dict)   # compute node name -> conv1..convN / fc


def layer_labels(path: Path) -> dict[str, str]:
    model = onnx.load(str(path))
    out, convs = {}, 0
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS:
            if node.op_type.startswith("Conv"):
                convs += 1
                out[node.name] = f"conv{convs}"
            else:
                out[node.name] = "fc"
    return out


def build_cases(work: Path) -> list[Case]:
    x_train, y_train = synthetic(1024, seed=0)
    calibration = [x_train[:32], x_train[32:64]]
    val_small, val_large = synthetic(256, seed=1), synthetic(600, seed=2)

    tiny = train_and_export([8, "M", 16, "M", 16], x_train[:512], y_train[:512], 30, work / "tiny.onnx", seed=0)
    deep = train_and_export([8, 8, "M", 16, 16, "M", 16, 16, 16, 16], x_train, y_train, 80, work / "deep8.onnx",
                            seed=0)

    def act(w, c):
        activation_outlier(w, c[1], c[2], channel=0)

    def wgt(w, c):
        weight_outlier(w, c[0], c[1], channel=0)

    def both(w, c):
        weight_outlier(w, c[1], c[2], channel=0)       # conv3 (per-tensor weights)
        activation_outlier(w, c[5], c[6], channel=1)   # conv7 reads conv6's 1e4 channel

    cases = [
        Case("activation-outlier", edit_weights(tiny, work / "activation_outlier.onnx", act), "per_channel",
             calibration, val_small, ["conv3"]),
        Case("weight-outlier", edit_weights(tiny, work / "weight_outlier.onnx", wgt), "per_tensor",
             calibration, val_small, ["conv2"]),
        Case("two-outliers-8conv", edit_weights(deep, work / "two_outliers_8conv.onnx", both), "per_tensor",
             calibration, val_large, ["conv3", "conv7"]),
    ]
    for case in cases:
        case.labels = layer_labels(case.fp32)
    return cases


# ---- measuring ---------------------------------------------------------------------------------

def accuracy(model: Path | onnx.ModelProto, validation: tuple[np.ndarray, np.ndarray]) -> float:
    x, y = validation
    return float((onnx_logits(model, x).argmax(1) == y).mean())


def kept_fp32(model: Path | onnx.ModelProto, labels: dict[str, str]) -> list[str]:
    """Compute layers of the fp32 model that read no dequantized tensor in `model`."""
    if isinstance(model, Path):
        model = onnx.load(str(model))
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.name for n in model.graph.node if n.op_type in COMPUTE_OPS and any(i in dq for i in n.input)}
    return [label for name, label in labels.items() if name not in quantized]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The tools' progress bars and chatter stay out of the table."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def row(case: Case, method: str, fp32_acc: float, int8_acc: float, after: float | None, kept: list[str] | None,
        seconds: float, **extra: Any) -> dict[str, Any]:
    return {"model": case.name, "method": method, "fp32_acc": fp32_acc, "int8_acc": int8_acc,
            "after_fallback_acc": after, "kept_fp32": kept, "seconds": round(seconds, 2), **extra}


def run_edgetransfer(case: Case, quantizer: str, fallback: bool, work: Path, fp32_acc: float) -> dict[str, Any]:
    out = work / f"{case.name}.{quantizer}.{'fallback' if fallback else 'plain'}.onnx"
    scheme = Quantization(quantizer=quantizer, weights=case.weights, max_drop=BUDGET, fallback=fallback)
    start = time.perf_counter()
    with quiet():
        report = quantize_model(case.fp32, out, scheme=scheme, preset=PRESET, calibration=case.calibration,
                                validation=case.validation)
    seconds = time.perf_counter() - start
    measured = accuracy(out, case.validation)
    assert abs(measured - report.int8_val_accuracy) < 1e-9, (measured, report.int8_val_accuracy)
    plain = report.candidates[0]["val_accuracy"]
    method = f"edgetransfer {quantizer} + fallback" if fallback else f"{quantizer} INT8 (no fallback)"
    return row(case, method, fp32_acc, plain, measured if fallback else None, kept_fp32(out, case.labels), seconds,
               within_budget=report.within_budget,
               ranking=[{"layer": case.labels.get(r["layer"], r["layer"]), "sensitivity": r["sensitivity"],
                         "val_accuracy_after": r["val_accuracy_after"]} for r in report.fallback])


def nncf_advanced(case: Case) -> Any:
    """The parameters edgetransfer's NncfQuantizer gives nncf.quantize for this scheme (asymmetric, no reduce_range)."""
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, OverflowFix,
                                                       QuantizationParameters)

    return AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=case.weights == "per_channel"),
        overflow_fix=OverflowFix.DISABLE, batchwise_statistics=True)


def run_nncf_accuracy_control(case: Case, backend: str, ranking: str, fp32_acc: float) -> dict[str, Any]:
    """nncf.quantize_with_accuracy_control on the ONNX model (ONNX backend) or its OpenVINO conversion.

    `ranking="metric"`: validation_fn returns the metric alone, as NNCF's documentation does; NNCF then
    validates each image on its own and ranks by the accuracy each revert gives on the 300 images the
    INT8 model gets most wrong. `ranking="nmse"`: validation_fn also returns each image's logits and
    NNCF ranks by the normalized MSE of the outputs (its OpenVINO backend only).
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    x_val, y_val = case.validation
    # one image per item: NNCF ranks on `ranking_subset_size` *items* and compares per-item values
    items = [(x_val[i:i + 1], int(y_val[i])) for i in range(len(x_val))]

    if backend == "onnx":
        model: Any = onnx.load(str(case.fp32))
        input_name = next(i.name for i in model.graph.input)

        def infer(m: Any, x: np.ndarray) -> np.ndarray:
            return onnx_logits(m, x)
    else:
        import openvino as ov

        model = ov.convert_model(str(case.fp32))
        input_name = model.inputs[0].get_any_name()
        core = ov.Core()

        def infer(m: Any, x: np.ndarray) -> np.ndarray:
            compiled = m if isinstance(m, ov.CompiledModel) else core.compile_model(m, "CPU")
            return np.concatenate([compiled(x[i:i + 64])[0] for i in range(0, len(x), 64)])

    def validate(m: Any, data: Any) -> tuple[float, list[list[np.ndarray]] | None]:
        batch = list(data)
        out = infer(m, np.concatenate([b[0] for b in batch]))
        acc = float((out.argmax(1) == np.array([b[1] for b in batch])).mean())
        return acc, ([[o[None]] for o in out] if ranking == "nmse" else None)

    handler = _Collect()
    nncf_log = logging.getLogger("nncf")
    saved = nncf_log.handlers[:], nncf_log.level
    nncf_log.handlers[:] = [handler]
    nncf_log.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        with quiet():
            result = nncf.quantize_with_accuracy_control(
                model,
                calibration_dataset=nncf.Dataset(case.calibration, lambda b: {input_name: b}),
                validation_dataset=nncf.Dataset(items, lambda item: {input_name: item[0]}),
                validation_fn=validate,
                max_drop=BUDGET / 100.0,
                drop_type=nncf.DropType.ABSOLUTE,
                preset=nncf.QuantizationPreset.MIXED,   # asymmetric activations, as in the edgetransfer rows
                subset_size=sum(len(b) for b in case.calibration),
                advanced_quantization_parameters=nncf_advanced(case),
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    ranking_subset_size=RANKING_SAMPLES))
    finally:
        nncf_log.handlers[:], level = saved
        nncf_log.setLevel(level)
    seconds = time.perf_counter() - start

    quantized = [m for m in handler.messages if m.startswith("Metric of quantized model")]
    int8_acc = float(quantized[-1].rsplit(":", 1)[1]) if quantized else float("nan")
    if backend == "onnx":
        after = accuracy(result, case.validation)
        kept = kept_fp32(result, case.labels)
    else:
        after = float((infer(result, x_val).argmax(1) == y_val).mean())
        kept = openvino_kept_fp32(result, case.labels)
    reverted = [m.split(":", 1)[1].split() for m in handler.messages if re.match(r"Reverted \d+ operations", m)]
    order = [case.labels.get(op.split("/")[0], op.split("/")[0]) for ops in reverted for op in ops]
    return row(case, f"nncf.quantize_with_accuracy_control ({backend}, {ranking} ranking)", fp32_acc, int8_acc,
               after, kept, seconds, within_budget=(fp32_acc - after) * 100 <= BUDGET + 1e-9,
               nncf_revert_order=order)


def openvino_kept_fp32(model: Any, labels: dict[str, str]) -> list[str]:
    """Compute layers (named after their ONNX nodes) with no FakeQuantize or int8 constant feeding them."""
    def quantized_input(node: Any, depth: int = 0) -> bool:
        for inp in node.inputs():
            src = inp.get_source_output().get_node()
            kind = src.get_type_name()
            if kind == "FakeQuantize" or (kind == "Constant" and src.get_element_type().get_type_name() in
                                          ("i8", "u8", "i4", "u4")):
                return True
            if depth < 4 and kind in ("Convert", "Reshape", "Transpose", "Multiply", "Subtract") \
                    and quantized_input(src, depth + 1):
                return True
        return False

    quantized = {op.get_friendly_name().split("/")[0] for op in model.get_ordered_ops()
                 if op.get_type_name() in ("Convolution", "MatMul") and quantized_input(op)}
    return [label for name, label in labels.items() if name not in quantized]


# ---- the run -----------------------------------------------------------------------------------

def table(rows: list[dict[str, Any]]) -> str:
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f}"

    def kept(v: list[str] | None) -> str:
        if v is None:
            return "?"
        return f"{len(v)} ({', '.join(v)})" if v else "0"

    lines = ["| model | method | fp32 acc | int8 acc | after fallback acc | layers kept fp32 | seconds |",
             "|---|---|---:|---:|---:|---|---:|"]
    lines += [f"| {r['model']} | {r['method']} | {pct(r['fp32_acc'])} | {pct(r['int8_acc'])} | "
              f"{pct(r['after_fallback_acc'])} | {kept(r['kept_fp32'])} | {r['seconds']:.1f} |" for r in rows]
    return "\n".join(lines)


def nncf_rows(case: Case, backends: list[str], fp32_acc: float) -> tuple[list[dict[str, Any]], list[str]]:
    """NNCF's accuracy control on the first backend that works: both rankings on OpenVINO, metric on ONNX."""
    for backend in backends:
        rows: list[dict[str, Any]] = []
        try:
            for ranking in (["metric", "nmse"] if backend == "openvino" else ["metric"]):
                rows.append(run_nncf_accuracy_control(case, backend, ranking, fp32_acc))
                print(f"  {case.name}: {rows[-1]['method']} {rows[-1]['seconds']:.1f} s", file=sys.stderr)
            return rows, [backend]  # the rest of the run uses the backend that worked
        except Exception as exc:  # noqa: BLE001 - the other backend may still work
            print(f"  nncf accuracy control ({backend}) failed on {case.name}: {exc}", file=sys.stderr)
    return [row(case, "nncf.quantize_with_accuracy_control (failed)", fp32_acc, float("nan"), None, None, 0.0)], []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write every row (and the environment) to this JSON file")
    parser.add_argument("--nncf-backend", choices=["auto", "openvino", "onnx"], default="auto",
                        help="backend for nncf.quantize_with_accuracy_control (auto: OpenVINO, else ONNX)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

    import nncf  # before setting its level: importing it sets its own
    import torch

    for name in ("nncf", "edgetransfer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    backends = ["openvino", "onnx"] if args.nncf_backend == "auto" else [args.nncf_backend]

    total = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgetransfer-bench-quantize-") as tmp:
        work = Path(tmp)
        cases = build_cases(work)
        print(f"built {len(cases)} models in {time.perf_counter() - total:.1f} s", file=sys.stderr)
        for case in cases:
            fp32_acc = accuracy(case.fp32, case.validation)
            for quantizer in ("onnxruntime", "nncf"):
                for fallback in (False, True):
                    rows.append(run_edgetransfer(case, quantizer, fallback, work, fp32_acc))
                    print(f"  {case.name}: {rows[-1]['method']} {rows[-1]['seconds']:.1f} s", file=sys.stderr)
            more, worked = nncf_rows(case, backends, fp32_acc)
            rows += more
            backends = worked or backends
            for r in rows:
                r.setdefault("culprits", case.culprits)
    elapsed = time.perf_counter() - total

    print(table(rows))
    print(f"\nbudget {BUDGET} accuracy points; culprits: "
          + "; ".join(f"{c.name} → {', '.join(c.culprits)}" for c in cases)
          + f"; whole run {elapsed:.0f} s on {os.cpu_count()} CPUs", flush=True)
    if args.out:
        env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
               "nncf": nncf.__version__, "budget_points": BUDGET, "ranking_samples": RANKING_SAMPLES,
               "total_seconds": round(elapsed, 1)}
        with contextlib.suppress(ImportError):
            import openvino

            env["openvino"] = openvino.__version__
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
