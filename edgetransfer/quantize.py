"""Calibration → one explicit-QDQ ONNX file, with an accuracy budget that keeps sensitive layers in fp32.

Why QDQ: TensorRT (explicit quantization), OpenVINO and ONNX Runtime all run QuantizeLinear /
DequantizeLinear graphs as real INT8, so one file serves every target (DESIGN.md, "Quantization").

Who quantizes is a small class per tool filling two hooks (`available`, `_quantize`), looked up by
name in `QUANTIZERS`; nothing else here knows which tool ran. `quantize_model` tries the scheme's
quantizer (or every available one for `auto`), measures each against fp32 in ONNX Runtime, keeps the
best (`_preference`), and — when it misses a gate of the target profile (the accuracy drop budget on
the validation split, or top-1 agreement with fp32 on the validation + calibration images: `Goal`) —
keeps layers in fp32, most sensitive first, until every gate is met (the report lists what each layer
saved, and what to try next when the gates are still missed).

Where the target's compiler runs here, it is in the search too (`CompilerCheck`): every candidate is
compiled and run as the device would, and compiler fidelity (compiled vs the QDQ file in ONNX Runtime)
is one more gate the fallback aims at. Two INT8 implementations of one QDQ file round differently;
on an image whose top logits nearly tie, that difference alone can miss `validate`'s compiler gate,
and only measuring the compiled model finds it before `validate` does.

"Keep layer L in fp32" means the same thing whichever tool quantized: L's weights are fp32 and L
reads fp32 activations. Tools disagree on the second half (ONNX Runtime leaves the Q/DQ pair that
the *producer* of L's input asked for, so excluding L alone would not remove the rounding of its
input), so `_keep_fp32` rewires L's inputs past their Q→DQ pairs after the tool has run.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import hashlib
import heapq
import importlib.util
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .errors import DependencyError, UsageError
from .fsutil import atomic_path
from .progress import progress_bar
from .parity import Gates, Side, compare
from .targets import CalibrationPreset, GateSpec, Quantization

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

#: quantizable compute nodes: the "layers" that the accuracy budget may keep in fp32
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: ops whose output carries its input's quantization grid unchanged (data movement, max, clamps):
#: an fp32 twin of one of them fed by fp32 tensors removes rounding that a Q→DQ pair put *before* it
TRANSPARENT_OPS = frozenset({"Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                             "Identity", "Concat", "Split", "Slice", "Gather", "Pad"})
#: validation images used to rank layer sensitivity (NNCF's accuracy control ranks on 300 as well)
RANKING_SAMPLES = 300
EVAL_BATCH = 64


# ---- the report --------------------------------------------------------------------------------

@dataclass
class QuantizationReport:
    """What quantization did and cost. Accuracies are fractions (0..1); drops are percentage points."""

    quantizer: str
    candidates: list[dict[str, Any]]
    fp32_val_accuracy: float
    int8_val_accuracy: float
    drop: float
    budget: float
    within_budget: bool
    fallback: list[dict[str, Any]]
    excluded_layers: list[str]
    quantized_layers: int
    #: top-1 agreement of INT8 with fp32 on the agreement images (validation + calibration, see
    #: `quantize_model`), how many images that is, and the gate it must meet (None: no agreement gate)
    agreement: float = 1.0
    agreement_samples: int = 0
    min_agreement: float | None = None
    #: the drop is within the budget *and* the agreement meets `min_agreement` (*and* compiler fidelity
    #: meets its gates, where the compiler ran): what `validate` enforces
    within_gates: bool = True
    #: compiler fidelity of the kept model on the agreement images, where the target's compiler ran
    #: here (`CompilerCheck`): compiler, agreement, min_cosine, gates, failures. None: not measured
    compiler: dict[str, Any] | None = None
    #: when a gate is missed: what to try next, most promising first (empty when within the gates)
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CompilerCheck:
    """The target's compiler, as the search sees it: `run(qdq_file, batches)` compiles the file the
    way `compile` will and returns its logits on the batches (concatenated, in order); `gates` are the
    profile's compiler-fidelity gates. Nothing here knows which compiler it is (`name` is for reports)."""

    name: str
    gates: Gates
    run: Callable[[Path, Sequence[np.ndarray]], np.ndarray]


# ---- the quantizer interface -------------------------------------------------------------------

class Quantizer(abc.ABC):
    """Turns an fp32 ONNX file into a QDQ ONNX file. Subclasses fill `available` and `_quantize`.

    One instance serves one model, scheme and calibration set: it may keep what calibration computed
    between calls (the accuracy budget calls it again with other `exclude` lists). Use it as a
    context manager, or call `close()`, to drop that cache.
    """

    name: ClassVar[str]
    install_hint: ClassVar[str]

    @abc.abstractmethod
    def available(self) -> str | None:
        """None if usable here, else why not (with the install command)."""

    @abc.abstractmethod
    def _quantize(self, fp32_onnx: Path, out: Path, *, scheme: Quantization, preset: CalibrationPreset,
                  calibration: Sequence[np.ndarray], input_name: str, exclude: Sequence[str],
                  float_weights: bool) -> None:
        """Write the tool's own QDQ model to `out`.

        `float_weights`: keep weights as fp32 initializers behind a Q→DQ pair (the same numbers as int8
        initializers + DQ, but the fp32 values stay in the graph so one layer can be restored by a
        graph edit while ranking sensitivity).
        """

    def quantize(self, fp32_onnx: Path, out: Path, *, scheme: Quantization, preset: CalibrationPreset,
                 calibration: Sequence[np.ndarray], exclude: Sequence[str] = (), float_weights: bool = False) -> None:
        """Write a checked QDQ model to `out` (atomically) with the `exclude` layers in fp32 on fp32 inputs.

        The input model's metadata (class list, input spec) is carried over: tools drop or rewrite it.
        """
        import onnx

        reference = onnx.load(str(fp32_onnx))
        with tempfile.TemporaryDirectory(prefix="edgetransfer-quantize-") as tmp, _quiet(self.name):
            raw = Path(tmp) / "quantized.onnx"
            self._quantize(Path(fp32_onnx), raw, scheme=scheme, preset=preset, calibration=calibration,
                           input_name=_input_name(reference), exclude=list(exclude), float_weights=float_weights)
            model = onnx.load(str(raw))
        # the float ops read float tensors whichever tool ran (NNCF leaves them so already; ONNX
        # Runtime's quantizer still puts its neighbours' Q→DQ pairs on their inputs)
        floating = [node.name for node in model.graph.node if node.op_type in scheme.float_ops]
        if exclude or floating:
            _keep_fp32(model, [*exclude, *floating], reference)
        _snap_biases(model)
        del model.metadata_props[:]
        model.metadata_props.extend(reference.metadata_props)
        onnx.checker.check_model(model)
        with atomic_path(out) as tmp_out:
            onnx.save_model(model, str(tmp_out))

    def close(self) -> None:
        """Drop what this instance cached between calls."""

    def __enter__(self) -> Quantizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OnnxRuntimeQuantizer(Quantizer):
    """onnxruntime.quantization.quantize_static in QDQ format.

    Calibration runs once per instance; later calls (other `exclude` lists) reuse the ranges from
    ORT's calibration cache, so the accuracy budget's re-quantizations cost no inference.
    quant_pre_process is not run: on this project's exports (BatchNorm already folded by the
    exporter, shapes inferred) it changed no node and no output while adding ~10 s on ResNet-18.
    """

    name = "onnxruntime"
    install_hint = "pip install onnxruntime"
    _METHODS: ClassVar[dict[str, str]] = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

    def __init__(self) -> None:
        self._cache_dir: tempfile.TemporaryDirectory[str] | None = None

    def available(self) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return f"onnxruntime is not installed ({self.install_hint})"
        return None

    def _cache_file(self, fp32_onnx: Path, preset: CalibrationPreset, scheme: Quantization,
                    calibration: Sequence[np.ndarray]) -> Path:
        if self._cache_dir is None:
            self._cache_dir = tempfile.TemporaryDirectory(prefix="edgetransfer-ort-calibration-")
        stat = fp32_onnx.stat()
        key = (f"{fp32_onnx.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{preset.method}|{preset.percentile}|"
               f"{scheme.activations}|{[b.shape for b in calibration]}")
        return Path(self._cache_dir.name) / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def _quantize(self, fp32_onnx: Path, out: Path, *, scheme: Quantization, preset: CalibrationPreset,
                  calibration: Sequence[np.ndarray], input_name: str, exclude: Sequence[str],
                  float_weights: bool) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        symmetric = scheme.activations == "symmetric"
        cache = self._cache_file(fp32_onnx, preset, scheme, calibration)
        extra: dict[str, Any] = {
            # TensorRT runs only signed INT8 with zero point 0: symmetric means QInt8 + symmetric ranges
            "ActivationSymmetric": symmetric,
            "WeightSymmetric": True,
            "CalibTensorRangeSymmetric": symmetric,
            # collect one batch at a time: the histogram calibrators otherwise hold every activation of
            # every calibration image in memory at once (ORT applies the stride to every method)
            "CalibStridedMinMax": 1,
            "AddQDQPairToWeight": float_weights,
            "QuantizeBias": scheme.bias == "int32",
        }
        if preset.method == "percentile":
            extra["CalibPercentile"] = preset.percentile
        quantize_static(
            str(fp32_onnx), str(out),
            calibration_data_reader=None if cache.exists() else _BatchReader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=scheme.weights == "per_channel",
            reduce_range=scheme.reduce_range,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, self._METHODS[preset.method]),
            nodes_to_exclude=list(exclude),
            extra_options=extra,
            calibration_cache_path=str(cache),
        )

    def close(self) -> None:
        if self._cache_dir is not None:
            self._cache_dir.cleanup()
            self._cache_dir = None


class NncfQuantizer(Quantizer):
    """nncf.quantize on the ONNX model (NNCF's ONNX backend): OpenVINO's native post-training quantizer.

    NNCF quantizes the inputs of layers (not their outputs) and corrects biases for the rounding of
    weights. Preset PERFORMANCE gives symmetric activations, MIXED asymmetric ones.
    """

    name = "nncf"
    install_hint = "pip install nncf onnxruntime   (or: pip install 'edgetransfer[openvino]')"

    def available(self) -> str | None:
        missing = [m for m in ("nncf", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{' and '.join(missing)} not installed ({self.install_hint})"
        return None

    @staticmethod
    def _ranges(preset: CalibrationPreset) -> Any:
        """The preset's method as NNCF range estimators (NNCF has no KL method: entropy → histogram)."""
        from nncf.quantization.range_estimator import (
            AggregatorType, RangeEstimatorParameters, RangeEstimatorParametersSet,
            StatisticsCollectorParameters, StatisticsType)

        if preset.method == "entropy":
            return RangeEstimatorParametersSet.HISTOGRAM
        if preset.method == "percentile":
            side = StatisticsCollectorParameters(statistics_type=StatisticsType.QUANTILE,
                                                 aggregator_type=AggregatorType.MEAN,
                                                 quantile_outlier_prob=(100.0 - preset.percentile) / 100.0)
            return RangeEstimatorParameters(min=side, max=copy.deepcopy(side))
        return None  # minmax: NNCF's own default (mean over samples of per-sample min / max)

    def _quantize(self, fp32_onnx: Path, out: Path, *, scheme: Quantization, preset: CalibrationPreset,
                  calibration: Sequence[np.ndarray], input_name: str, exclude: Sequence[str],
                  float_weights: bool) -> None:
        import nncf
        import onnx
        from nncf.onnx.quantization.backend_parameters import BackendParameters
        from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, OverflowFix,
                                                           QuantizationParameters)

        symmetric = scheme.activations == "symmetric"
        advanced = AdvancedQuantizationParameters(
            weights_quantization_params=QuantizationParameters(per_channel=scheme.weights == "per_channel"),
            activations_range_estimator_params=self._ranges(preset),
            overflow_fix=OverflowFix.ENABLE if scheme.reduce_range else OverflowFix.DISABLE,
            batchwise_statistics=True,  # the items are batches: per-sample statistics within each
            backend_params={BackendParameters.COMPRESS_WEIGHTS: not float_weights})
        quantized = nncf.quantize(
            onnx.load(str(fp32_onnx)),
            nncf.Dataset(calibration, lambda batch: {input_name: _as_input(batch)}),
            preset=nncf.QuantizationPreset.PERFORMANCE if symmetric else nncf.QuantizationPreset.MIXED,
            subset_size=sum(len(b) for b in calibration),  # ≥ the number of batches: every batch is used
            # validate=False: a float op type the model does not contain is not an error
            ignored_scope=nncf.IgnoredScope(names=list(exclude), types=list(scheme.float_ops), validate=False),
            advanced_parameters=advanced)
        if symmetric:
            _signed_activations(quantized)
        onnx.save_model(quantized, str(out))


QUANTIZERS: dict[str, type[Quantizer]] = {
    OnnxRuntimeQuantizer.name: OnnxRuntimeQuantizer,
    NncfQuantizer.name: NncfQuantizer,
}


# ---- the one function the stages call ----------------------------------------------------------

def quantize_model(fp32_onnx: Path, out: Path, *, scheme: Quantization, preset: CalibrationPreset,
                   calibration: Sequence[np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                   gates: GateSpec | None = None, compiler: CompilerCheck | None = None) -> QuantizationReport:
    """Write the QDQ model to `out` (one .onnx file, atomically) and report how it compares with fp32.

    `calibration`: NCHW float32 batches from train/val (never test). `validation`: (images, labels) of
    the validation split. `gates`: the target profile's quantization gates (`gates.quantization`),
    the ones `validate` will enforce on the test images; None judges the accuracy budget alone.

    The model must meet every gate, not only the budget: the accuracy drop on the validation split
    must be within `scheme.max_drop` (and within `gates.max_accuracy_drop` when that is stricter), and
    the top-1 agreement with fp32 must reach `gates.min_agreement`. When it does not, the fallback
    keeps layers in fp32 until it does (or runs out of layers it may keep). `compiler`: the target's
    compiler where it runs here; its fidelity gates (compiled vs QDQ in ONNX Runtime, on the agreement
    images) then join the others.

    Where agreement is measured — the validation images *and* the calibration images: agreement with
    fp32 needs no labels, and the validation split alone is too coarse to judge a 0.99 gate (on 50
    images one disagreement is 0.98, and a model at 0.985 on the test images reads as 1.0 or 0.98 by
    luck). The calibration images (300 with the default preset) are images of the same distribution
    that the test split is drawn from; they set the quantization ranges, but a range is one min/max
    (or percentile) per tensor, so the function is hardly fitted to them and agreement measured on
    them tracks held-out agreement closely. Images in both sets (calibration may draw from val) count
    once. Accuracy, which needs labels, stays on the validation split.

    The model is written even when a gate is missed (the caller turns `within_gates=False` into exit
    code 1); `advice` then says what to try next.
    """
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    x_val, labels = _check_inputs(fp32_onnx, out, scheme, calibration, validation)
    quantizers = _select_quantizers(scheme.quantizer)
    goal = Goal.of(scheme, gates)

    with tempfile.TemporaryDirectory(prefix="edgetransfer-quantize-") as tmp, contextlib.ExitStack() as stack:
        ctx = _Context(fp32_onnx, Path(tmp), scheme, preset, calibration, x_val, labels, compiler)
        candidates: list[dict[str, Any]] = []
        trials: list[tuple[_Trial, Quantizer]] = []
        failures: list[str] = []
        for quantizer in progress_bar(quantizers, "quantizing", total=len(quantizers)):
            stack.enter_context(quantizer)
            start = time.perf_counter()
            try:
                trial = ctx.trial(quantizer, ())
            except Exception as exc:  # a tool failing on this model is reported, the others still compete
                log.warning("quantizer %s failed: %s", quantizer.name, exc)
                failures.append(f"{quantizer.name}: {exc}")
                candidates.append({"quantizer": quantizer.name, "val_accuracy": None, "agreement": None,
                                   "seconds": round(time.perf_counter() - start, 3), "error": str(exc)})
                continue
            candidates.append({"quantizer": quantizer.name, "val_accuracy": trial.accuracy,
                               "agreement": trial.agreement, **trial.compiler_row(),
                               "seconds": round(time.perf_counter() - start, 3)})
            trials.append((trial, quantizer))
        if not trials:
            raise UsageError("no quantizer could quantize the model: " + "; ".join(failures), path=fp32_onnx)
        best, quantizer = max(trials, key=lambda t: _preference(t[0]))
        fallback: list[dict[str, Any]] = []
        if not goal.met(ctx.drop(best), best) and scheme.fallback and scheme.max_fallback_layers > 0:
            best, fallback = _fallback(ctx, quantizer, best, met=lambda t: goal.met(ctx.drop(t), t),
                                       rank=lambda t: goal.rank(ctx.drop(t), t))
        quantized_layers = len(_quantized_layers(ctx.load(best.path)))
        with atomic_path(out) as tmp_out:
            shutil.copyfile(best.path, tmp_out)
    drop = ctx.drop(best)
    within_gates = goal.met(drop, best)
    report = QuantizationReport(
        quantizer=quantizer.name, candidates=candidates, fp32_val_accuracy=ctx.fp32_accuracy,
        int8_val_accuracy=best.accuracy, drop=drop, budget=goal.max_drop,
        within_budget=drop <= goal.max_drop + 1e-9, fallback=fallback, excluded_layers=list(best.exclude),
        quantized_layers=quantized_layers, agreement=best.agreement, agreement_samples=ctx.agreement_samples,
        min_agreement=goal.min_agreement, within_gates=within_gates,
        compiler=None if best.compiler is None else {
            "compiler": compiler.name, "samples": best.compiler.samples, "agreement": best.compiler.agreement,
            "min_cosine": best.compiler.min_cosine, "gates": asdict(compiler.gates),
            "failures": list(best.compiler.failures)})
    if not within_gates:
        report.advice = quantization_advice(report, scheme=scheme, preset=preset, tried=[q.name for q in quantizers],
                                            validation_samples=len(x_val))
    log.info("quantized with %s: %.2f points drop (budget %.2f), agreement %.4f on %d images (gate %s), "
             "%d layers kept in fp32%s", report.quantizer, drop, goal.max_drop, best.agreement,
             ctx.agreement_samples, goal.min_agreement, len(fallback),
             "" if best.compiler is None else f"; {compiler.name}: agreement {best.compiler.agreement:.4f}, "
                                              f"min cosine {best.compiler.min_cosine:.4f}")
    return report


# ---- the gates the search aims at ---------------------------------------------------------------

@dataclass(frozen=True)
class Goal:
    """What the quantized model must meet: the accuracy budget, the agreement gate and, where the
    compiler ran, its fidelity gates.

    `max_drop`: points on the labelled validation split (the stricter of the scheme's budget and the
    profile's `gates.quantization.max_accuracy_drop`). `min_agreement`: top-1 agreement with fp32 on
    the agreement images (None: no agreement gate). The compiler's gates travel with each trial's
    measurement (`_Trial.compiler`).
    """

    max_drop: float
    min_agreement: float | None = None

    @classmethod
    def of(cls, scheme: Quantization, gates: GateSpec | None) -> Goal:
        max_drop = scheme.max_drop
        if gates is not None and gates.max_accuracy_drop is not None:
            max_drop = min(max_drop, gates.max_accuracy_drop)
        return cls(max_drop=max_drop, min_agreement=None if gates is None else gates.min_agreement)

    def misses(self, drop: float, trial: _Trial) -> list[str]:
        """The gates missed, in words (empty: every gate met)."""
        out = []
        if drop > self.max_drop + 1e-9:
            out.append(f"accuracy drop {drop:.2f} points > {self.max_drop}")
        if self.min_agreement is not None and trial.agreement < self.min_agreement - 1e-12:
            out.append(f"top-1 agreement with fp32 {trial.agreement:.4f} < {self.min_agreement}")
        if trial.compiler is not None:
            out.extend(f"compiler fidelity: {failure}" for failure in trial.compiler.failures)
        return out

    def met(self, drop: float, trial: _Trial) -> bool:
        return not self.misses(drop, trial)

    def rank(self, drop: float, trial: _Trial) -> tuple[int, float, float, float]:
        """Higher is better: gates met, then agreement, then compiler cosine, then accuracy (the smaller drop)."""
        cosine = 1.0 if trial.compiler is None else trial.compiler.min_cosine
        return (-len(self.misses(drop, trial)), trial.agreement, cosine, -drop)


def quantization_advice(report: QuantizationReport, *, scheme: Quantization, preset: CalibrationPreset,
                        tried: Sequence[str], validation_samples: int) -> list[str]:
    """What to try next when the INT8 model misses a gate: concrete commands, most promising first."""
    advice = []
    if report.compiler is not None and report.compiler["failures"]:
        advice.append(f"{report.compiler['compiler']} runs this QDQ file differently from ONNX Runtime "
                      f"({'; '.join(report.compiler['failures'])}): a scheme its compiler executes as written "
                      f"(for OpenVINO the intel-cpu profile's: NNCF, symmetric activations, `float_ops: [Add]`), "
                      f"or more layers in fp32 (`--max-fallback-layers`)")
    presets = [p for p in ("percentile", "entropy") if p != preset.name]
    if presets:
        advice.append(f"calibrate differently: `edgetransfer quantize RUN --target TARGET --calib {presets[0]}` "
                      f"(or --calib {' / '.join(presets[1:] or presets)}); ranges that clip rare outliers keep "
                      f"more resolution for typical activations (used: {preset.name}, {preset.method})")
    others = [name for name in QUANTIZERS if name not in tried]
    if others:
        advice.append(f"another quantizer: `--quantizer {others[0]}` (tried: {', '.join(tried)})")
    if len(report.excluded_layers) >= scheme.max_fallback_layers or not scheme.fallback:
        advice.append(f"allow more layers in fp32: `--max-fallback-layers {max(2 * scheme.max_fallback_layers, 4)}` "
                      f"(the search stopped at {scheme.max_fallback_layers}; each costs some INT8 speed)")
    elif report.fallback or report.excluded_layers:
        advice.append("the layers left in INT8 bring no error of their own that keeping them in fp32 would "
                      "remove: the loss is spread out; a calibration preset or another quantizer helps more")
    if scheme.weights == "per_tensor":
        advice.append("per-channel weights (quantization.weights: per_channel in a copy of the profile, "
                      "`edgetransfer targets show TARGET > my.yaml`, then --target my.yaml)")
    if report.min_agreement is not None and report.min_agreement < 1.0:
        needed = int(np.ceil(1.0 / (1.0 - report.min_agreement)))
        if validation_samples < needed:
            advice.append(f"more validation images: {validation_samples} labelled images judge the accuracy budget "
                          f"in steps of {100.0 / validation_samples:.1f} points and one disagreement of "
                          f"{needed} test images already misses agreement {report.min_agreement}; "
                          f"aim for at least {needed} in val/ and test/")
    return advice


# ---- measuring --------------------------------------------------------------------------------

@dataclass
class _Trial:
    """One quantized model and how it did: accuracy on the validation split, agreement with fp32 on
    the agreement images (validation + calibration), and compiler fidelity on the same images where
    the compiler ran (compiled vs this QDQ file in ONNX Runtime)."""

    path: Path
    exclude: tuple[str, ...]
    accuracy: float
    agreement: float
    compiler: Any = None  # parity.PairReport

    def compiler_row(self) -> dict[str, Any]:
        if self.compiler is None:
            return {}
        return {"compiler_agreement": self.compiler.agreement, "compiler_min_cosine": self.compiler.min_cosine}


class _Context:
    """What every trial of one `quantize_model` call shares: inputs, fp32 reference, a work folder."""

    def __init__(self, fp32_onnx: Path, workdir: Path, scheme: Quantization, preset: CalibrationPreset,
                 calibration: Sequence[np.ndarray], x_val: np.ndarray, labels: np.ndarray,
                 compiler: CompilerCheck | None = None):
        import onnx

        self.fp32_onnx, self.workdir, self.scheme, self.preset = fp32_onnx, workdir, scheme, preset
        self.compiler = compiler
        self.calibration, self.x_val, self.labels = calibration, x_val, labels
        self.reference = onnx.load(str(fp32_onnx))
        #: validation images first, then the calibration images not among them
        self.x_agree: list[np.ndarray] = [x_val, *_unseen(calibration, x_val)]
        self.agreement_samples = sum(len(x) for x in self.x_agree)
        self.fp32_agree = onnx_logits(fp32_onnx, self.x_agree)
        self.fp32_logits = self.fp32_agree[:len(x_val)]
        self.fp32_accuracy = _accuracy(self.fp32_logits, labels)
        self._count = 0

    @staticmethod
    def load(path: Path) -> onnx.ModelProto:
        import onnx

        return onnx.load(str(path))

    def build(self, quantizer: Quantizer, exclude: Sequence[str], *, float_weights: bool = False) -> Path:
        self._count += 1
        path = self.workdir / f"{self._count:03d}-{quantizer.name}.onnx"
        quantizer.quantize(self.fp32_onnx, path, scheme=self.scheme, preset=self.preset,
                           calibration=self.calibration, exclude=exclude, float_weights=float_weights)
        return path

    def trial(self, quantizer: Quantizer, exclude: Sequence[str]) -> _Trial:
        path = self.build(quantizer, exclude)
        logits = onnx_logits(path, self.x_agree)
        fidelity = None
        if self.compiler is not None:
            fidelity = compare(f"compiler fidelity: INT8 QDQ (ONNX Runtime) vs {self.compiler.name}",
                               Side("onnxruntime", "int8"), Side(self.compiler.name, "int8"), logits,
                               self.compiler.run(path, self.x_agree), None, self.compiler.gates)
        return _Trial(path=path, exclude=tuple(exclude), accuracy=_accuracy(logits[:len(self.x_val)], self.labels),
                      agreement=float((logits.argmax(1) == self.fp32_agree.argmax(1)).mean()), compiler=fidelity)

    def drop(self, trial: _Trial) -> float:
        return round((self.fp32_accuracy - trial.accuracy) * 100.0, 6)


def _unseen(calibration: Sequence[np.ndarray], x_val: np.ndarray) -> list[np.ndarray]:
    """The calibration batches without the images that are also validation images (no copy when none is)."""
    seen = {hashlib.sha1(np.ascontiguousarray(x).tobytes()).digest() for x in x_val}
    out = []
    for batch in calibration:
        keep = np.array([hashlib.sha1(np.ascontiguousarray(x).tobytes()).digest() not in seen for x in batch])
        if keep.all():
            out.append(batch)
        elif keep.any():
            out.append(batch[keep])
    return out


def _preference(trial: _Trial) -> tuple[float, float]:
    """How `auto` ranks quantizers: the highest top-1 agreement with fp32, then accuracy; ties keep
    QUANTIZERS' order (max is stable). The gates are then enforced on the chosen one by the fallback.

    Agreement first because it bounds everything else: two models that agree on a fraction a of the
    images differ in accuracy by at most 1 − a, while on a validation split of a few dozen images an
    INT8 model "more accurate" than fp32 is noise — ranking by accuracy once kept a candidate at 92 %
    agreement over one at 98 %, and it then missed the agreement gate on the test images by more.
    """
    return trial.agreement, trial.accuracy


def onnx_logits(model: Path | onnx.ModelProto, x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Run a model (path or ModelProto) in ONNX Runtime on the CPU, in batches.

    `x`: one NCHW array, or a sequence of them (their logits are concatenated in order)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    arrays = [x] if isinstance(x, np.ndarray) else list(x)
    return np.concatenate([session.run(None, {name: _as_input(a[i:i + EVAL_BATCH])})[0]
                           for a in arrays for i in range(0, len(a), EVAL_BATCH)])


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


# ---- the accuracy budget ----------------------------------------------------------------------

def _fallback(ctx: _Context, quantizer: Quantizer, start: _Trial, *, met: Callable[[_Trial], bool],
              rank: Callable[[_Trial], Any]) -> tuple[_Trial, list[dict[str, Any]]]:
    """Keep layers in fp32, most sensitive first, until `met(trial)` (every gate: `Goal.met`).

    The search knows no gate itself: `met` says when to stop and `rank` (higher is better) which step
    to keep when none meets them.

    Ranking is cheap: one extra quantization with fp32 weights behind Q→DQ pairs, then per layer a
    graph edit that leaves *only that layer* in INT8 (every other layer fp32, on fp32 inputs), scored
    by the logit error vs fp32 (on up to RANKING_SAMPLES of the agreement images: no labels needed)
    that it alone brings, as a share of the error of the whole INT8 model. Leave-one-in, not
    leave-one-out: with two independent culprits, keeping either one alone in fp32 changes nothing,
    so leave-one-out ranks by noise. Each layer kept is then real: the quantizer runs again with the
    exclusions and the full validation and agreement images judge it. Returns the first step that
    meets the gates (else the best by `rank`, ties: fewer layers) and one row per layer kept.
    """
    fake = ctx.load(ctx.build(quantizer, (), float_weights=True))
    x_all = np.concatenate(ctx.x_agree) if len(ctx.x_agree) > 1 else ctx.x_val
    # evenly spaced, not the first N: image arrays are often ordered by class
    pick = np.unique(np.linspace(0, len(x_all) - 1, min(RANKING_SAMPLES, len(x_all))).astype(int))
    x_rank, ref = x_all[pick], ctx.fp32_agree[pick]
    del x_all
    layers = _quantized_layers(fake)
    names = [name for name, _ in layers]

    def error(keep: Sequence[str]) -> float:
        edited = copy.deepcopy(fake)
        _keep_fp32(edited, keep, ctx.reference)
        return _mse(onnx_logits(edited, x_rank), ref)

    full, floor = error(()), error(names)  # every layer INT8 / only the quantizers outside layers left
    scores: list[tuple[float, str, str]] = []
    for name, op_type in progress_bar(layers, "ranking layer sensitivity", total=len(layers)):
        alone = error([n for n in names if n != name])
        scores.append(((alone - floor) / (full - floor) if full > floor else 0.0, name, op_type))
    scores.sort(key=lambda s: -s[0])
    log.info("layer sensitivity (share of the INT8 logit error each layer brings alone): %s",
             ", ".join(f"{n} {s:.3f}" for s, n, _ in scores[:10]))

    steps, rows = [start], []
    allowed = scores[:ctx.scheme.max_fallback_layers]
    for sensitivity, name, op_type in progress_bar(allowed, "keeping layers in fp32", total=len(allowed)):
        if sensitivity <= 0 or met(steps[-1]):
            break  # every gate met, or no layer left that brings error of its own
        trial = ctx.trial(quantizer, (*steps[-1].exclude, name))
        rows.append({"layer": name, "op_type": op_type, "sensitivity": round(sensitivity, 6),
                     "val_accuracy_after": trial.accuracy, "drop_after": ctx.drop(trial),
                     "agreement_after": trial.agreement, **{f"{k}_after": v for k, v in trial.compiler_row().items()},
                     "saved_points": round(ctx.drop(steps[-1]) - ctx.drop(trial), 6)})
        log.info("kept %s in fp32: drop %.2f → %.2f points, agreement %.4f → %.4f", name, ctx.drop(steps[-1]),
                 ctx.drop(trial), steps[-1].agreement, trial.agreement)
        steps.append(trial)
    passing = [i for i, step in enumerate(steps) if met(step)]
    best = passing[0] if passing else max(range(len(steps)), key=lambda i: (rank(steps[i]), -i))
    return steps[best], rows[:best]


# ---- graph edits ------------------------------------------------------------------------------

def _quantized_layers(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(name, op_type) of compute nodes that read at least one dequantized tensor, in graph order."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [(n.name, n.op_type) for n in model.graph.node
            if n.op_type in COMPUTE_OPS and n.name and any(i in dq_outputs for i in n.input)]


def _keep_fp32(model: onnx.ModelProto, layers: Collection[str], reference: onnx.ModelProto) -> None:
    """Make each named layer read fp32 tensors, in place.

    An input that arrives through QuantizeLinear → DequantizeLinear is rewired to the tensor before
    the pair. Where that tensor comes out of a quantization-transparent op (Relu, MaxPool, Reshape...)
    that itself read a Q→DQ pair, an fp32 twin of the op is added, so the rounding done upstream of it
    is bypassed too. Where a quantizer removed an activation and let a Q's clamp stand in for it
    (ONNX Runtime folds Relu/Clip that way), the activation is restored from `reference`, the fp32
    model. Pairs left without a consumer are pruned.
    """
    import onnx

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    ref_producer = {o: n for n in reference.graph.node for o in n.output}
    twins: dict[str, str] = {}
    added: list[onnx.NodeProto] = []

    def clone(node: onnx.NodeProto, inputs: list[str]) -> onnx.NodeProto:
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name = f"{node.name}_fp32" if node.name else ""
        del twin.input[:]
        twin.input.extend(inputs)
        del twin.output[:]
        twin.output.extend(f"{o}_fp32" if o else "" for o in node.output)
        added.append(twin)
        twins.update({o: t for o, t in zip(node.output, twin.output) if o})
        return twin

    def fp32(name: str) -> str:
        if not name or name in twins:
            return twins.get(name, name)
        node = producer.get(name)
        result = name
        if node is not None and node.op_type == "DequantizeLinear":
            source = producer.get(node.input[0])
            if source is not None and source.op_type == "QuantizeLinear":
                result = fp32(source.input[0])
        elif node is not None and node.op_type in TRANSPARENT_OPS:
            inputs = [fp32(i) for i in node.input]
            if inputs != list(node.input):
                clone(node, inputs)
                result = twins[name]
        elif node is not None and name in ref_producer and ref_producer[name].op_type != node.op_type \
                and ref_producer[name].op_type in TRANSPARENT_OPS:
            activation = ref_producer[name]
            for extra in activation.input[1:]:
                _copy_constant(model, reference, extra)
            result = clone(activation, [name, *activation.input[1:]]).output[0]
        twins[name] = result
        return result

    wanted = set(layers)
    for node in list(graph.node):
        if node.name in wanted:
            rewired = [fp32(i) for i in node.input]
            del node.input[:]
            node.input.extend(rewired)
    graph.node.extend(added)
    _toposort(graph)
    _prune(graph)


def _snap_biases(model: onnx.ModelProto) -> None:
    """Round every float bias of a quantized Conv/Gemm to its integer accumulator grid (s_x · s_w).

    Why: a float bias is one number to an emulating runtime and another to an integer kernel.
    ONNX Runtime's fused QLinearConv rounds it to int32 in units of s_x · s_w; the same file run op
    by op (ONNX Runtime without graph optimizations) or by OpenVINO keeps it exact. The difference is
    a fraction of an output step, enough to move ~1 % of the values next to a rounding midpoint to
    the other side at every layer: on the demo's EfficientNet-Lite0 (NNCF, float biases) ONNX
    Runtime disagreed with itself across optimization levels on the same file (min logit cosine
    0.983). On the grid the bias means the same to every runtime (0.9997); it moves by at most half
    a step of s_x · s_w, far below the quantization error itself. Biases already int32 (ONNX
    Runtime's quantizer with `bias: int32`) and layers on float inputs are left alone.
    """
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}

    def dq_scale(tensor: str) -> np.ndarray | None:
        node = producer.get(tensor)
        # through ops that move or select grid values without making new ones (a MaxPool between the
        # DequantizeLinear and the layer keeps its input on that grid; a Clip bound need not be on it)
        while node is not None and node.op_type in TRANSPARENT_OPS - {"Clip", "Concat"}:
            node = producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
            return None
        return numpy_helper.to_array(inits[node.input[1]]).astype(np.float64).reshape(-1)

    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        s_x, s_w = dq_scale(node.input[0]), dq_scale(node.input[1])
        bias = numpy_helper.to_array(inits[node.input[2]])
        if s_x is None or s_w is None or bias.dtype != np.float32:
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        # a per-channel input scale maps onto output channels only in a depthwise convolution
        if s_x.size > 1 and not (node.op_type == "Conv" and groups == bias.size == s_x.size):
            continue
        if s_w.size not in (1, bias.size):
            continue
        step = s_x * s_w
        if not np.all(step > 0):
            continue
        snapped = (np.rint(bias.astype(np.float64) / step) * step).astype(np.float32)
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(snapped, node.input[2]))


def _copy_constant(model: onnx.ModelProto, reference: onnx.ModelProto, name: str) -> None:
    """Make constant `name` of the fp32 model (an initializer or a Constant node's output) exist in `model`."""
    graph = model.graph
    if not name or name in {i.name for i in graph.initializer} or any(name in n.output for n in graph.node):
        return
    for init in reference.graph.initializer:
        if init.name == name:
            graph.initializer.append(init)
            return
    for node in reference.graph.node:
        if node.op_type == "Constant" and name in node.output:
            graph.node.append(node)
            return


def _toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after its producers, keeping the existing order where it is free."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needs = [{producer[name] for name in n.input if name in producer} for n in nodes]
    consumers: dict[int, list[int]] = {}
    for i, producers in enumerate(needs):
        for p in producers:
            consumers.setdefault(p, []).append(i)
    waiting = [len(p) for p in needs]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for c in consumers.get(i, []):
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, c)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle")
    del graph.node[:]
    graph.node.extend(order)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads, then initializers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = outputs | {i for n in graph.node for i in n.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _signed_activations(model: onnx.ModelProto) -> None:
    """Re-express unsigned zero-point-0 quantizers as signed INT8, zero point 0, covering the same range.

    NNCF's symmetric preset quantizes non-negative tensors (after Relu) as UINT8 with zero point 0,
    but TensorRT — the reason for a symmetric scheme — runs only signed INT8 Q/DQ. The range
    [0, 255·s] becomes [-128·s', 127·s'] with s' = 255·s / 127: one bit of resolution is spent,
    exactly as ONNX Runtime's symmetric QInt8 activations spend it.
    """
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    converted: dict[tuple[str, str], tuple[str, str]] = {}
    requantized: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        scale, zero = inits.get(node.input[1]), inits.get(node.input[2])
        if scale is None or zero is None or zero.data_type != TensorProto.UINT8 or numpy_helper.to_array(zero).any():
            continue
        key = (scale.name, zero.name)
        if key not in converted:
            s = numpy_helper.to_array(scale).astype(np.float32) * np.float32(255.0 / 127.0)
            z = np.zeros(numpy_helper.to_array(zero).shape, dtype=np.int8)
            names = (f"{scale.name}_int8", f"{zero.name}_int8")
            model.graph.initializer.extend([numpy_helper.from_array(s, names[0]), numpy_helper.from_array(z, names[1])])
            converted[key] = names
        node.input[1], node.input[2] = converted[key]
        if node.op_type == "QuantizeLinear":
            requantized.add(node.output[0])
    for info in model.graph.value_info:  # NNCF records the UINT8 type of each Q output
        if info.name in requantized:
            info.type.tensor_type.elem_type = TensorProto.INT8
    _prune(model.graph)


# ---- small helpers ----------------------------------------------------------------------------

class _BatchReader:
    """ONNX Runtime's calibration reader over the caller's batches: hands out the arrays, never copies.

    `__len__`/`set_range` let ORT collect statistics one window (batch) at a time.
    """

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]):
        self.input_name, self.batches = input_name, batches
        self.set_range(0, len(batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._indices = iter(range(start_index, min(end_index, len(self.batches))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._indices, None)
        return None if i is None else {self.input_name: _as_input(self.batches[i])}


def _as_input(batch: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(batch, dtype=np.float32)  # no copy when it already is


def _input_name(model: onnx.ModelProto) -> str:
    initializers = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


class _DropPreprocessHint(logging.Filter):
    """ORT asks for quant_pre_process on every call; measured useless on our exports (see above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Please consider") and "pre-processing" in message)


@contextlib.contextmanager
def _quiet(tool: str) -> Iterator[None]:
    """Keep the tools' own stdout chatter (progress bars, percentile tables) out of the CLI's output."""
    root, hint = logging.getLogger(), _DropPreprocessHint()
    root.addFilter(hint)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as chatter:
            yield
    finally:
        root.removeFilter(hint)
    if chatter.getvalue().strip():
        log.debug("%s output:\n%s", tool, chatter.getvalue())


def _select_quantizers(name: str) -> list[Quantizer]:
    """Every usable quantizer for `auto`, else the named one; a missing tool is exit code 3."""
    if name == "auto":
        instances = [cls() for cls in QUANTIZERS.values()]
        usable = [q for q in instances if q.available() is None]
        if not usable:
            reasons = "; ".join(f"{q.name}: {q.available()}" for q in instances)
            raise DependencyError(f"no quantizer is usable here ({reasons})", field="quantization.quantizer")
        return usable
    if name not in QUANTIZERS:
        raise UsageError(f"unknown quantizer {name!r}; known: auto, {', '.join(QUANTIZERS)}",
                         field="quantization.quantizer")
    quantizer = QUANTIZERS[name]()
    reason = quantizer.available()
    if reason is not None:
        raise DependencyError(f"quantizer {name!r} is not usable here: {reason}", field="quantization.quantizer")
    return [quantizer]


def _check_inputs(fp32_onnx: Path, out: Path, scheme: Quantization, calibration: Sequence[np.ndarray],
                  validation: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise DependencyError("quantization measures accuracy in ONNX Runtime (pip install onnx onnxruntime)")
    if not fp32_onnx.is_file():
        raise UsageError("fp32 ONNX model not found; run `edgetransfer export` first", path=fp32_onnx)
    if fp32_onnx.resolve() == out.resolve():
        raise UsageError("the quantized model must not overwrite the fp32 model", path=out)
    problems = scheme.problems()
    if problems:
        raise UsageError("; ".join(problems), field="quantization")
    if not calibration or any(np.ndim(b) != 4 or len(b) == 0 for b in calibration):
        raise UsageError("calibration must be a non-empty list of non-empty NCHW batches", field="calibration")
    x_val, labels = np.asarray(validation[0]), np.asarray(validation[1])
    if x_val.ndim != 4 or len(x_val) == 0 or labels.shape != (len(x_val),):
        raise UsageError(f"validation must be (N, C, H, W) images with N labels, got {x_val.shape} and "
                         f"{labels.shape}", field="validation")
    return x_val, labels.astype(np.int64)


__all__ = ["COMPUTE_OPS", "QUANTIZERS", "Goal", "NncfQuantizer", "OnnxRuntimeQuantizer", "QuantizationReport", "Quantizer",
           "quantization_advice", "quantize_model"]
