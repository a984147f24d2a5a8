"""The accuracy-budget search: which quantizer, and which layers stay in fp32, so that the INT8 model
meets every gate the target profile sets.

`quantize_model` tries the scheme's quantizer (or every available one for `auto`), measures each
against fp32 in ONNX Runtime, keeps the best (`_preference`), and — when it misses a gate of the
target profile (the metric's drop budget on the validation split, or agreement with fp32 on the
validation + calibration images: `Goal`) — keeps layers in fp32, most sensitive first, until every
gate is met (the report lists what each layer saved, and what to try next when the gates are still
missed).

What "accuracy" and "agreement" mean is the caller's `Metric`: top-1 accuracy and the same top-1 class
for a classifier (`TOP1`, the default); another task passes its own (the anomaly scorer: AUROC and
the same side of the threshold). Sensitivity ranking needs no metric: it compares raw outputs.

Where the target's compiler runs here, it is in the search too (`CompilerCheck`): every candidate is
compiled and run as the device would, and compiler fidelity (compiled vs the QDQ file in ONNX Runtime)
is one more gate the fallback aims at. Two INT8 implementations of one QDQ file round differently;
on an image whose top logits nearly tie, that difference alone can miss `validate`'s compiler gate,
and only measuring the compiled model finds it before `validate` does.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DependencyError, UsageError
from ..fsutil import atomic_path
from ..parity import Gates, Side, compare, cosines
from ..progress import progress_bar
from ..targets import CalibrationPreset, GateSpec, Quantization
from .qdq import keep_fp32, quantized_layers
from .quantizers import QUANTIZERS, Quantizer, as_input, select_quantizers

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

#: agreement images used to rank layer sensitivity: every layer is one more run over them, and the
#: ranking only orders the layers (each layer kept is then judged on every agreement image). On the
#: demo model 100 images order the top layers as 300 did (benchmarks/int8_margin.py --layers)
RANKING_SAMPLES = 100
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
    #: what the `*_accuracy` fields and the drop measure (`Metric.name`: "accuracy" for a classifier)
    metric: str = "accuracy"
    #: labelled validation images the drop was measured on: one image is 100 / this many points, and
    #: when that is coarser than `budget` the search cannot see a drop the size of the budget
    validation_samples: int = 0
    #: nodes the caller kept fp32 in every candidate (`quantize_model(float_nodes=...)`)
    float_nodes: list[str] = field(default_factory=list)
    #: the worst per-image similarity with fp32 on the agreement images (`Metric.fidelity`: a
    #: classifier's minimum logit cosine), None where the task has no such measure
    min_cosine: float | None = None
    #: what the search aimed at past the gates (`Goal`): agreement, min cosine; whether it got there,
    #: and when it stopped short, why (in words)
    aim: dict[str, Any] = field(default_factory=dict)
    aim_met: bool = True
    stopped: str = ""
    #: layers the search kept in fp32, measured, and put back because they did not improve the figures
    fallback_rejected: list[dict[str, Any]] = field(default_factory=list)
    #: the sensitivity ranking: per layer the logit error it brings alone, as a share of all layers'
    #: (shares sum to at most 1), and the error the quantizers outside layers bring (no layer can remove it)
    sensitivity: dict[str, Any] = field(default_factory=dict)
    #: when a gate is missed: the alternatives measured with the same layers in fp32, best first
    alternatives: list[dict[str, Any]] = field(default_factory=list)

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


@dataclass(frozen=True)
class Metric:
    """What the search judges a candidate by, given the model's first output on a batch of images.

    `score(outputs, labels)`: a fraction in 0..1, higher is better (its drop from fp32, in points, is
    what the budget limits). `same(reference, candidate)`: per image, whether the candidate gives the
    answer the fp32 model gives (its mean is the agreement the gate limits; no labels needed, so it is
    measured on the calibration images too). `name` is for reports.
    """

    name: str
    score: Callable[[np.ndarray, np.ndarray], float]
    same: Callable[[np.ndarray, np.ndarray], np.ndarray]
    #: the worst per-image similarity of candidate to reference outputs (a classifier: the minimum
    #: logit cosine), what `Quantization.aim_min_cosine` aims at; None: the task has no such measure
    fidelity: Callable[[np.ndarray, np.ndarray], float] | None = None


def _top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def _same_top1(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    return reference.argmax(1) == candidate.argmax(1)


def _min_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    cos = cosines(reference, candidate)
    return float(cos.min()) if len(cos) else 1.0


#: a classifier: top-1 accuracy on the labels, the same top-1 class as fp32, the worst logit cosine
TOP1 = Metric("accuracy", _top1_accuracy, _same_top1, _min_cosine)


# ---- the one function the stages call ----------------------------------------------------------

def quantize_model(fp32_onnx: Path, out: Path, *, scheme: Quantization, preset: CalibrationPreset,
                   calibration: Sequence[np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                   gates: GateSpec | None = None, compiler: CompilerCheck | None = None,
                   metric: Metric = TOP1, float_nodes: Sequence[str] = (),
                   agreement_images: Sequence[np.ndarray] | None = None) -> QuantizationReport:
    """Write the QDQ model to `out` (one .onnx file, atomically) and report how it compares with fp32.

    `calibration`: NCHW float32 batches from train/val (never test). `validation`: (images, labels) of
    the validation split. `gates`: the target profile's quantization gates (`gates.quantization`),
    the ones `validate` will enforce on the test images; None judges the accuracy budget alone.

    The model must meet every gate, not only the budget: the accuracy drop on the validation split
    must be within `scheme.max_drop` (and within `gates.max_accuracy_drop` when that is stricter), and
    the top-1 agreement with fp32 must reach `gates.min_agreement`. When it does not, the fallback
    keeps layers in fp32 until it does (or runs out of layers it may keep). `compiler`: the target's
    compiler where it runs here; its fidelity gates (compiled vs QDQ in ONNX Runtime, on the agreement
    images) then join the others. `metric`: what accuracy and agreement mean (`TOP1` for a classifier;
    the labels are whatever `metric.score` reads). `float_nodes`: nodes that stay fp32 in every
    candidate, on fp32 inputs (an anomaly scorer's distances to its bank: a difference of large
    squared norms that INT8 would cancel away); the fallback adds layers to them.
    `agreement_images`: the batches agreement is measured on besides the validation images (default:
    the calibration batches; an anomaly scorer passes those it was not fitted on — its bank holds the
    good training images, on which any model agrees).

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
    quantizers = select_quantizers(scheme.quantizer)
    goal = Goal.of(scheme, gates, metric)

    with tempfile.TemporaryDirectory(prefix="edgetransfer-quantize-") as tmp, contextlib.ExitStack() as stack:
        ctx = _Context(fp32_onnx, Path(tmp), scheme, preset, calibration, x_val, labels, metric, compiler,
                       float_nodes=tuple(float_nodes), agreement_images=agreement_images)
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
        search = _Search()
        if not goal.aimed(ctx.drop(best), best):
            if scheme.fallback and scheme.max_fallback_layers > 0:
                best, search = _fallback(ctx, quantizer, best, goal)
            else:
                search.stopped = "the profile allows no layer in fp32 (fallback off or max_fallback_layers 0)"
        layer_count = len(quantized_layers(ctx.load(best.path)))
        # a miss is answered with measurements, not a list: each alternative a user could ask for
        # (another calibration method on the same images, the other quantizer, 8-bit weights), run
        # with the same layers in fp32 and judged on the same images
        measured = [] if goal.met(ctx.drop(best), best) else _alternatives(ctx, quantizer, best, goal)
        with atomic_path(out) as tmp_out:
            shutil.copyfile(best.path, tmp_out)
    drop = ctx.drop(best)
    within_gates = goal.met(drop, best)
    report = QuantizationReport(
        quantizer=quantizer.name, candidates=candidates, fp32_val_accuracy=ctx.fp32_accuracy,
        int8_val_accuracy=best.accuracy, drop=drop, budget=goal.max_drop,
        within_budget=drop <= goal.max_drop + 1e-9, fallback=search.kept, excluded_layers=list(best.exclude),
        quantized_layers=layer_count, agreement=best.agreement, agreement_samples=ctx.agreement_samples,
        min_agreement=goal.min_agreement, within_gates=within_gates,
        compiler=None if best.compiler is None else {
            "compiler": compiler.name, "samples": best.compiler.samples, "agreement": best.compiler.agreement,
            "min_cosine": best.compiler.min_cosine, "gates": asdict(compiler.gates),
            "failures": list(best.compiler.failures)}, metric=metric.name, float_nodes=list(float_nodes),
        validation_samples=len(x_val), min_cosine=best.fidelity,
        aim={"agreement": goal.aim_agreement, "min_cosine": goal.aim_fidelity},
        aim_met=goal.aimed(drop, best), stopped=search.stopped, fallback_rejected=search.rejected,
        sensitivity=search.sensitivity, alternatives=measured)
    if metric is TOP1 and len(x_val) and 100.0 / len(x_val) > goal.max_drop:  # an image is a step of accuracy
        log.warning("the %s budget (%.2f points) is finer than the validation split resolves: on %d images one "
                    "image is %.2f points, so a drop the size of the budget cannot be seen here; `validate` judges it "
                    "on the test split (more images in val/ let the search see it too)", metric.name, goal.max_drop,
                    len(x_val), 100.0 / len(x_val))
    if not within_gates:
        report.advice = quantization_advice(report, scheme=scheme, preset=preset, tried=[q.name for q in quantizers],
                                            validation_samples=len(x_val), measured=measured)
    elif not report.aim_met:
        log.warning("INT8 meets the gates but not the margin the search aims at (%s): %s",
                    ", ".join(goal.short_of_aim(drop, best)), report.stopped)
    log.info("quantized with %s: %.2f points drop (budget %.2f), agreement %.4f on %d images (gate %s, aim %.4f)%s, "
             "%d layers kept in fp32%s", report.quantizer, drop, goal.max_drop, best.agreement,
             ctx.agreement_samples, goal.min_agreement, goal.aim_agreement or 0.0,
             "" if best.fidelity is None else f", min cosine {best.fidelity:.4f} (aim {goal.aim_fidelity})",
             len(best.exclude),
             "" if best.compiler is None else f"; {compiler.name}: agreement {best.compiler.agreement:.4f}, "
                                              f"min cosine {best.compiler.min_cosine:.4f}")
    return report


# ---- the gates the search aims at ---------------------------------------------------------------

@dataclass(frozen=True)
class Goal:
    """What the quantized model must meet (the gates) and what the search aims at past them (the aim).

    `max_drop`: points on the labelled validation split (the stricter of the scheme's budget and the
    profile's `gates.quantization.max_accuracy_drop`). `min_agreement`: top-1 agreement with fp32 on
    the agreement images (None: no agreement gate). The compiler's gates travel with each trial's
    measurement (`_Trial.compiler`). `aim_agreement` leaves `Quantization.agreement_margin` of the
    allowed disagreement unused; `aim_fidelity` is `Quantization.aim_min_cosine` where the metric has
    a fidelity measure. A model that meets the gates but not the aim passes; the search only keeps
    looking while layers are left.
    """

    max_drop: float
    min_agreement: float | None = None
    metric: str = TOP1.name  # for the messages
    aim_agreement: float | None = None
    aim_fidelity: float | None = None

    @classmethod
    def of(cls, scheme: Quantization, gates: GateSpec | None, metric: Metric = TOP1) -> Goal:
        max_drop = scheme.max_drop
        if gates is not None and gates.max_accuracy_drop is not None:
            max_drop = min(max_drop, gates.max_accuracy_drop)
        min_agreement = None if gates is None else gates.min_agreement
        aim_agreement = None if min_agreement is None else 1.0 - (1.0 - min_agreement) * (1.0 - scheme.agreement_margin)
        # the aims are margins past the gates: without gates (the budget alone) there is nothing to aim past
        aim_fidelity = (scheme.aim_min_cosine if gates is not None and metric.fidelity is not None
                        and scheme.aim_min_cosine > 0 else None)
        return cls(max_drop=max_drop, min_agreement=min_agreement, metric=metric.name,
                   aim_agreement=aim_agreement, aim_fidelity=aim_fidelity)

    def misses(self, drop: float, trial: _Trial) -> list[str]:
        """The gates missed, in words (empty: every gate met)."""
        out = []
        if drop > self.max_drop + 1e-9:
            out.append(f"{self.metric} drop {drop:.2f} points > {self.max_drop}")
        if self.min_agreement is not None and trial.agreement < self.min_agreement - 1e-12:
            out.append(f"agreement with fp32 {trial.agreement:.4f} < {self.min_agreement}")
        if trial.compiler is not None:
            out.extend(f"compiler fidelity: {failure}" for failure in trial.compiler.failures)
        return out

    def short_of_aim(self, drop: float, trial: _Trial) -> list[str]:
        """Where a trial meets the gates but not the margin past them, in words."""
        out = []
        if self.aim_agreement is not None and trial.agreement < self.aim_agreement - 1e-12:
            out.append(f"agreement {trial.agreement:.4f} < aim {self.aim_agreement:.4f}")
        if self.aim_fidelity is not None and trial.fidelity is not None and trial.fidelity < self.aim_fidelity:
            out.append(f"min cosine {trial.fidelity:.4f} < aim {self.aim_fidelity}")
        return out

    def met(self, drop: float, trial: _Trial) -> bool:
        return not self.misses(drop, trial)

    def aimed(self, drop: float, trial: _Trial) -> bool:
        return self.met(drop, trial) and not self.short_of_aim(drop, trial)

    def rank(self, drop: float, trial: _Trial) -> tuple[int, int, float, float, float, float]:
        """Higher is better: gates met, then aims met, then the smaller output error against fp32 (squared,
        on the worst 5 % of the agreement images: `_tail_error`), then agreement, then compiler cosine,
        then the smaller drop.

        The error before agreement and before the worst cosine: once the figures sit past their gates,
        one image more or less in agreement is the noise the margin is there to absorb, and the worst
        cosine is one image's (on the demo, keeping single layers in fp32 swung it between 0.79 and
        0.97 while the error moved a few percent); the tail error moves with every layer, follows the
        images that flip, and is what the sensitivity ranking measures."""
        cosine = 1.0 if trial.compiler is None else trial.compiler.min_cosine
        return (-len(self.misses(drop, trial)), -len(self.short_of_aim(drop, trial)), -trial.error, trial.agreement,
                cosine, -drop)


def _alternatives(ctx: _Context, quantizer: Quantizer, best: _Trial, goal: Goal) -> list[dict[str, Any]]:
    """Measure what a user would try next, each with the search's fp32 layers, best first (`Goal.rank`)."""
    import dataclasses

    options: list[tuple[str, Quantizer, Quantization | None, CalibrationPreset | None]] = []
    for method in ("percentile", "entropy", "minmax"):
        if method != ctx.preset.method:
            options.append((f"`--calib {method}`", quantizer, None,
                            dataclasses.replace(ctx.preset, name=method, method=method)))
    for name, cls in QUANTIZERS.items():
        if name != quantizer.name and (other := cls()).available() is None:
            options.append((f"`--quantizer {name}`", other, dataclasses.replace(ctx.scheme, quantizer=name), None))
    if ctx.scheme.reduce_range:
        options.append(("8-bit weights (`reduce_range: false` in a copy of the profile; exact only on CPUs with "
                         "VNNI or AMX)", quantizer, dataclasses.replace(ctx.scheme, reduce_range=False), None))
    rows = []
    for label, tool, scheme, preset in progress_bar(options, "measuring alternatives", total=len(options)):
        try:
            with tool if tool is not quantizer else contextlib.nullcontext():
                trial = ctx.trial(tool, best.exclude, scheme=scheme, preset=preset)
        except Exception as exc:  # an alternative that cannot run is reported, not fatal
            rows.append({"try": label, "error": str(exc)})
            continue
        rows.append({"try": label, "meets_gates": goal.met(ctx.drop(trial), trial), "drop": ctx.drop(trial),
                     "agreement": trial.agreement, "min_cosine": trial.fidelity, "_rank": goal.rank(ctx.drop(trial), trial)})
    rows.sort(key=lambda r: r.get("_rank", (-99,)), reverse=True)
    for r in rows:
        r.pop("_rank", None)
    return rows


def quantization_advice(report: QuantizationReport, *, scheme: Quantization, preset: CalibrationPreset,
                        tried: Sequence[str], validation_samples: int,
                        measured: Sequence[dict[str, Any]] = ()) -> list[str]:
    """What to try next when the INT8 model misses a gate: measured alternatives first (each with its
    figures on the same images and the same fp32 layers), then concrete commands."""
    advice = []
    for row in measured:
        if "error" in row:
            continue
        figures = (f"drop {row['drop']:.2f} points, agreement {row['agreement']:.4f}"
                   + ("" if row.get("min_cosine") is None else f", min cosine {row['min_cosine']:.4f}"))
        advice.append(f"{row['try']}: measured {figures} with the same layers in fp32 — "
                      f"{'meets every gate' if row['meets_gates'] else 'still misses a gate'} "
                      f"(now: drop {report.drop:.2f}, agreement {report.agreement:.4f})")
    if measured:
        return advice + [a for a in _commands(report, scheme=scheme, preset=preset, tried=tried,
                                              validation_samples=validation_samples)
                         if not a.startswith(("calibrate differently", "another quantizer"))]
    return advice + _commands(report, scheme=scheme, preset=preset, tried=tried, validation_samples=validation_samples)


def _commands(report: QuantizationReport, *, scheme: Quantization, preset: CalibrationPreset,
              tried: Sequence[str], validation_samples: int) -> list[str]:
    advice = []
    if report.compiler is not None and report.compiler["failures"]:
        advice.append(f"{report.compiler['compiler']} runs this QDQ file differently from ONNX Runtime "
                      f"({'; '.join(report.compiler['failures'])}): a scheme its compiler executes as written "
                      f"(for OpenVINO the intel-cpu profile's: NNCF, symmetric activations, `float_ops: [Add]`), "
                      f"or more layers in fp32 (`--max-fallback-layers`)")
    presets = [p for p in ("percentile", "entropy") if p != preset.name]
    if presets:
        commands = " or ".join(f"`--calib {p}`" for p in presets)
        used = preset.name if preset.name == preset.method else f"{preset.name} ({preset.method})"
        advice.append(f"calibrate differently: `edgetransfer quantize RUN --target TARGET` with {commands}; ranges "
                      f"that clip rare outliers keep more resolution for typical activations (used: {used})")
    others = [name for name in QUANTIZERS if name not in tried]
    if others:
        advice.append(f"another quantizer: `--quantizer {others[0]}` (tried: {', '.join(tried)})")
    if len(report.excluded_layers) >= scheme.max_fallback_layers or not scheme.fallback:
        advice.append(f"allow more layers in fp32: `--max-fallback-layers {max(2 * scheme.max_fallback_layers, 4)}` "
                      f"(the search stopped at {scheme.max_fallback_layers}; each costs some INT8 speed)")
    elif report.fallback or report.excluded_layers or report.fallback_rejected:
        advice.append(f"the search stopped: {report.stopped or 'no layer left that improved the figures'}; "
                      f"the loss is spread out, so a calibration preset or another quantizer helps more")
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
    fidelity: float | None = None  # Metric.fidelity on the agreement images (a classifier: min logit cosine)
    error: float = 0.0  # squared output error against fp32 on the worst TAIL of the agreement images

    def compiler_row(self) -> dict[str, Any]:
        if self.compiler is None:
            return {}
        return {"compiler_agreement": self.compiler.agreement, "compiler_min_cosine": self.compiler.min_cosine}


class _Context:
    """What every trial of one `quantize_model` call shares: inputs, fp32 reference, a work folder."""

    def __init__(self, fp32_onnx: Path, workdir: Path, scheme: Quantization, preset: CalibrationPreset,
                 calibration: Sequence[np.ndarray], x_val: np.ndarray, labels: np.ndarray, metric: Metric,
                 compiler: CompilerCheck | None = None, float_nodes: tuple[str, ...] = (),
                 agreement_images: Sequence[np.ndarray] | None = None):
        import onnx

        self.fp32_onnx, self.workdir, self.scheme, self.preset = fp32_onnx, workdir, scheme, preset
        self.compiler, self.metric, self.float_nodes = compiler, metric, float_nodes
        self.calibration, self.x_val, self.labels = calibration, x_val, labels
        self.reference = onnx.load(str(fp32_onnx))
        #: validation images first, then the calibration images not among them
        extra = calibration if agreement_images is None else agreement_images
        self.x_agree: list[np.ndarray] = [x_val, *_unseen(extra, x_val)]
        self.agreement_samples = sum(len(x) for x in self.x_agree)
        self.fp32_agree = onnx_logits(fp32_onnx, self.x_agree)
        self.fp32_logits = self.fp32_agree[:len(x_val)]
        self.fp32_accuracy = metric.score(self.fp32_logits, labels)
        self._count = 0

    @staticmethod
    def load(path: Path) -> onnx.ModelProto:
        import onnx

        return onnx.load(str(path))

    def build(self, quantizer: Quantizer, exclude: Sequence[str], *, float_weights: bool = False,
              scheme: Quantization | None = None, preset: CalibrationPreset | None = None) -> Path:
        self._count += 1
        path = self.workdir / f"{self._count:03d}-{quantizer.name}.onnx"
        quantizer.quantize(self.fp32_onnx, path, scheme=scheme or self.scheme, preset=preset or self.preset,
                           calibration=self.calibration, exclude=[*self.float_nodes, *exclude],
                           float_weights=float_weights)
        return path

    def trial(self, quantizer: Quantizer, exclude: Sequence[str], *, scheme: Quantization | None = None,
              preset: CalibrationPreset | None = None) -> _Trial:
        path = self.build(quantizer, exclude, scheme=scheme, preset=preset)
        logits = onnx_logits(path, self.x_agree)
        fidelity = None
        if self.compiler is not None:
            fidelity = compare(f"compiler fidelity: INT8 QDQ (ONNX Runtime) vs {self.compiler.name}",
                               Side("onnxruntime", "int8"), Side(self.compiler.name, "int8"), logits,
                               self.compiler.run(path, self.x_agree), None, self.compiler.gates)
        return _Trial(path=path, exclude=tuple(exclude),
                      accuracy=self.metric.score(logits[:len(self.x_val)], self.labels),
                      agreement=float(np.mean(self.metric.same(self.fp32_agree, logits))), compiler=fidelity,
                      fidelity=None if self.metric.fidelity is None else self.metric.fidelity(self.fp32_agree, logits),
                      error=_tail_error(self.fp32_agree, logits))

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
    return np.concatenate([session.run(None, {name: as_input(a[i:i + EVAL_BATCH])})[0]
                           for a in arrays for i in range(0, len(a), EVAL_BATCH)])


#: the share of images whose errors `_tail_error` averages: the images INT8 moves most are the ones
#: whose answers flip (on the demo, per-image max |Δlogit| has a median of 0.16 and a 99th percentile of
#: 0.6, and every flipped test image sat in that tail)
TAIL = 0.05


def _tail_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared output error of the worst TAIL of images (at least one): a mean over the whole
    set is ruled by the many images INT8 barely moves, a minimum or maximum by one image."""
    per_image = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    worst = max(1, int(np.ceil(TAIL * len(per_image))))
    return float(np.sort(per_image)[-worst:].mean()) if len(per_image) else 0.0


# ---- the accuracy budget ----------------------------------------------------------------------

@dataclass
class _Search:
    """What the fallback did: rows of the layers kept in fp32 and of those tried and put back, the
    sensitivity ranking, and why it stopped (empty when it reached its aim)."""

    kept: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: dict[str, Any] = field(default_factory=dict)
    stopped: str = ""


def _fallback(ctx: _Context, quantizer: Quantizer, start: _Trial, goal: Goal) -> tuple[_Trial, _Search]:
    """Keep layers in fp32, most sensitive first, until the goal's gates *and* aim are met.

    Ranking is cheap: one extra quantization with fp32 weights behind Q→DQ pairs, then per layer a
    graph edit that leaves *only that layer* in INT8 (every other layer fp32, on fp32 inputs), scored
    by the tail logit error vs fp32 (`_tail_error`) it adds to the floor (the error of the quantizers
    outside layers, which no layer kept in fp32 removes), on up to RANKING_SAMPLES of the agreement images (no labels
    needed). Leave-one-in, not leave-one-out: with two independent culprits, keeping either one alone
    in fp32 changes nothing, so leave-one-out ranks by noise. The ranking is by the added error
    itself (a share of the sum of all layers' added errors is reported: shares never exceed 1).

    Each candidate layer is then real: the quantizer runs again with it excluded and the validation
    and agreement images judge it. A layer is kept only when the measured figures improve
    (`Goal.rank`); otherwise it is held once and tried together with the next candidate (two
    culprits: neither helps while the other stays INT8), and put back (recorded in `rejected`) when
    the pair does not improve them either. The search
    stops when the aim is met, when `max_fallback_layers` layers are kept, or when twice that many
    candidates were tried, and says which.
    """
    fake = ctx.load(ctx.build(quantizer, (), float_weights=True))
    x_all = np.concatenate(ctx.x_agree) if len(ctx.x_agree) > 1 else ctx.x_val
    # evenly spaced, not the first N: image arrays are often ordered by class
    pick = np.unique(np.linspace(0, len(x_all) - 1, min(RANKING_SAMPLES, len(x_all))).astype(int))
    x_rank, ref = x_all[pick], ctx.fp32_agree[pick]
    del x_all
    layers = quantized_layers(fake)
    names = [name for name, _ in layers]

    def error(keep: Sequence[str]) -> float:
        edited = copy.deepcopy(fake)
        keep_fp32(edited, keep, ctx.reference)
        return _tail_error(onnx_logits(edited, x_rank), ref)

    full, floor = error(()), error(names)  # every layer INT8 / only the quantizers outside layers left
    added = []
    for name, op_type in progress_bar(layers, "ranking layer sensitivity", total=len(layers)):
        added.append((error([n for n in names if n != name]) - floor, name, op_type))
    added.sort(key=lambda a: -a[0])
    total = sum(max(a, 0.0) for a, _, _ in added)
    share = {name: (max(a, 0.0) / total if total > 0 else 0.0) for a, name, _ in added}
    search = _Search(sensitivity={
        "samples": len(x_rank), "error_all_int8": full, "error_outside_layers": floor,
        "outside_layers_share": floor / full if full > 0 else 0.0,
        "layers": [{"layer": n, "op_type": op, "added_error": a, "share": round(share[n], 6)} for a, n, op in added]})
    log.info("layer sensitivity (tail logit error each layer adds alone; its share of all layers'): %s; the quantizers "
             "outside layers bring %.0f%% of the whole error (no layer kept in fp32 removes that)",
             ", ".join(f"{n} {a:.3g} ({share[n]:.2f})" for a, n, _ in added[:8]),
             100.0 * search.sensitivity["outside_layers_share"])

    current, pending = start, None  # pending: a layer that did not help alone, held to try with the next
    budget = ctx.scheme.max_fallback_layers
    candidates = [(a, n, op) for a, n, op in added if a > 0][:2 * budget]
    for error_added, name, op_type in progress_bar(candidates, "keeping layers in fp32", total=len(candidates)):
        if goal.aimed(ctx.drop(current), current):
            break
        if len(current.exclude) - len(start.exclude) + (pending is not None) >= budget:
            search.stopped = f"{budget} layers kept in fp32, the most the profile allows (--max-fallback-layers)"
            break
        held = () if pending is None else (pending[0]["layer"],)
        trial = ctx.trial(quantizer, (*current.exclude, *held, name))
        improved = goal.rank(ctx.drop(trial), trial) > goal.rank(ctx.drop(current), current)
        row = {"layer": name, "op_type": op_type, "sensitivity": round(share[name], 6),
               "val_accuracy_after": trial.accuracy, "drop_after": ctx.drop(trial),
               "agreement_after": trial.agreement, "min_cosine_after": trial.fidelity,
               **{f"{k}_after": v for k, v in trial.compiler_row().items()},
               "saved_points": round(ctx.drop(current) - ctx.drop(trial), 6)}
        log.info("%s %s%s in fp32: drop %.2f → %.2f points, agreement %.4f → %.4f%s",
                 "kept" if improved else "put back" if pending is not None else "held", name,
                 f" (with {held[0]})" if held else "", ctx.drop(current), ctx.drop(trial), current.agreement,
                 trial.agreement, "" if trial.fidelity is None else f", min cosine {current.fidelity:.4f} → {trial.fidelity:.4f}")
        if improved:
            if pending is not None:  # two culprits: neither helps while the other stays INT8; both rows
                # carry the pair's figures, the saving on the first
                search.kept.append({**pending[1], **{k: v for k, v in row.items() if k.endswith("_after")},
                                    "saved_points": row["saved_points"], "kept_with": name})
                row = {**row, "saved_points": 0.0}
            search.kept.append(row)
            current, pending = trial, None
        elif pending is None:
            pending = ({"layer": name}, row)
        else:
            search.rejected.extend([pending[1], row])
            pending = None
    else:
        if not goal.aimed(ctx.drop(current), current):
            search.stopped = ("every layer that brings error of its own was tried" if len(candidates) < 2 * budget
                              else f"{2 * budget} layers tried (twice --max-fallback-layers)")
    if pending is not None:
        search.rejected.append(pending[1])
    return current, search


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


__all__ = ["CompilerCheck", "Goal", "QuantizationReport", "onnx_logits", "quantization_advice", "quantize_model"]
