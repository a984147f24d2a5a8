"""The validate stage: run the reference and the artifacts on held-out images, compare, gate.

Inputs are produced once by the deployment preprocessing and fed to every side, so a difference in
the report is a difference in the models, never in how they were fed. The pairs follow DESIGN.md:
export fidelity (torch vs ONNX fp32), the lowering effect (torch fp32 vs the INT8/fp16 model, judged
against labels), compiler fidelity (the ONNX the target compiled from, in ONNX Runtime, vs the
compiled artifact), and a dynamic-batch check of what will be deployed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Runner, get_backend
from .baselines import assess, summary_line, warning_of
from .bench import measure
from .data.folder import Sample, scan_split
from .errors import UsageError
from .export import ONNX_FILE
from .fsutil import write_json, write_text
from .onnxfile import check_onnx_file
from .parity import FP32_GATES, Gates, PairReport, ParityReport, Side, compare
from .spec import InputSpec, RunMeta
from .stages import as_target, compiled_input, iter_batches, load_compiled, run_splits, target_dir
from .targets import Target

log = logging.getLogger(__name__)


def held_out_samples(meta: RunMeta, data: str | Path | None) -> tuple[list[Sample], str]:
    """The images to validate on, and where they came from.

    Without `data`: the run's own test split, rebuilt from its recorded root, seed and fractions.
    With `data`: `DIR/test/` if present, else DIR's class folders.
    """
    if data is None:
        splits = run_splits(meta)
        return splits.test, f"{splits.root} (test split of the training data)"
    folder = Path(data)
    if (folder / "test").is_dir():
        folder = folder / "test"
    return scan_split(folder, meta.classes), str(folder)


def run_all(samples: Sequence[Sample], spec: InputSpec, runners: dict[str, Runner], *,
            batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every runner's logits over the samples, fed identical preprocessed batches."""
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    labels = []
    for x, y in iter_batches(samples, spec, batch_size, description="validating"):
        labels.append(y)
        for name, runner in runners.items():
            outputs[name].append(runner.infer(x))
    return {k: np.concatenate(v) for k, v in outputs.items()}, np.concatenate(labels)


@dataclass
class _Side:
    key: str
    runner: Runner

    def side(self, suffix: str = "") -> Side:
        return Side(self.runner.description + suffix, self.runner.precision)


@dataclass
class Measured:
    """Every side's outputs on the held-out images (the first output: logits, or an anomaly score), and
    what the deployed side did at batch 1 vs its largest batch."""

    sides: dict[str, _Side]
    outputs: dict[str, np.ndarray]
    labels: np.ndarray
    deployed: _Side
    batch_max: int
    single: np.ndarray
    batched: np.ndarray
    few_labels: np.ndarray
    latency: Any


def measure_sides(run: Path, meta: RunMeta, samples: Sequence[Sample], tgt: Target | None,
                  batch_size: int) -> Measured:
    """Load the reference, the export and (for a target) the QDQ file and the compiled artifact; run them
    all on identical batches; time the deployed one at batch 1."""
    onnx_path = run / ONNX_FILE
    if not onnx_path.exists():
        raise UsageError("no exported model; run `edgetransfer export` first", path=onnx_path)
    check_onnx_file(onnx_path)
    sides = {"torch": _Side("torch", get_backend("torch").load(run)),
             "onnx": _Side("onnx", get_backend("onnxruntime").load(onnx_path))}
    if tgt is not None:
        if tgt.quantized:
            sides["qdq"] = _Side("qdq", get_backend("onnxruntime").load(compiled_input(run, tgt)))
        sides["compiled"] = _Side("compiled", load_compiled(run, tgt))  # exit 3 when it cannot run here
    deployed = sides["compiled" if tgt else "onnx"]
    batch_max = tgt.batch.max if tgt else batch_size
    entered = []
    try:
        for s in sides.values():
            s.runner.__enter__()
            entered.append(s.runner)
        outputs, labels = run_all(samples, meta.input_spec, {k: s.runner for k, s in sides.items()},
                                  batch_size=min(batch_size, batch_max))
        few = samples[: min(len(samples), 2 * batch_max)]
        single, _ = run_all(few, meta.input_spec, {"deployed": deployed.runner}, batch_size=1)
        batched, few_labels = run_all(few, meta.input_spec, {"deployed": deployed.runner}, batch_size=batch_max)
        latency = measure(deployed.runner, (3, meta.input_spec.height, meta.input_spec.width),
                          batch=1, warmup=3, iterations=20)
    finally:
        for r in reversed(entered):
            r.__exit__(None, None, None)
    return Measured(sides=sides, outputs=outputs, labels=labels, deployed=deployed, batch_max=batch_max,
                    single=single["deployed"], batched=batched["deployed"], few_labels=few_labels, latency=latency)


def validate(run: str | Path, data: str | Path | None = None, *, target: str | Path | Target | None = None,
             batch_size: int = 16) -> ParityReport:
    """Compare the run's torch model with its exported (and, for a target, lowered and compiled) models.

    Without a target: torch vs ONNX fp32, written to `RUN/parity.*`. With a target: every pair of
    DESIGN.md with the target's gates, written to `RUN/<target>/parity.*`, plus batch-1 latency of the
    compiled artifact. The caller decides the exit code from `report.passed`. An anomaly run is
    judged by its scores (`anomaly.validate`).
    """
    run = Path(run)
    meta = RunMeta.load(run / "meta.json")
    tgt = as_target(target) if target is not None else None
    samples, source = held_out_samples(meta, data)
    if not samples:
        raise UsageError("no held-out images to validate on", path=source)
    m = measure_sides(run, meta, samples, tgt, batch_size)
    if meta.task == "anomaly":
        from .anomaly.validate import score_report

        return score_report(run, meta, tgt, m, source, samples)
    logits, labels, sides, deployed = m.outputs, m.labels, m.sides, m.deployed
    pairs = _pairs(sides, logits, labels, tgt, run)
    pairs.append(compare(f"dynamic batch: {deployed.runner.description} batch 1 vs {m.batch_max}",
                         deployed.side(f" batch {m.batch_max}"), deployed.side(" batch 1"),
                         m.batched, m.single, m.few_labels,
                         Gates(min_agreement=1.0, max_abs_diff=batch_tolerance(tgt))))
    out = target_dir(run, tgt) if tgt else run
    report = ParityReport(classes=meta.classes, pairs=pairs, context=report_context(run, meta, tgt, source, m),
                          latency=m.latency.to_dict(), summary=deployed_summary(logits["torch"], logits[deployed.key],
                                                                                labels, deployed.runner.precision))
    if tgt is not None:  # the bytes this report is about, hashed after they ran (bundle compares them)
        from .stages import checked_artifact_files

        report.artifact_files = checked_artifact_files(run, tgt)
    report.baselines = held_out_baselines(meta, logits["torch"], labels)
    report.context["torch fp32 accuracy vs baselines"] = summary_line(report.baselines)
    if (warning := warning_of(report.baselines)) is not None:
        report.warnings.append(warning)
        log.warning("WARNING: %s", warning)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "parity.json", report.to_dict())
    write_text(out / "parity.md", report.to_markdown())
    from .plots import parity_figure

    figure_pairs = {p.pair: (logits[a], logits[b]) for p, (a, b) in zip(pairs, pair_keys(sides, tgt))}
    parity_figure(report, figure_pairs, labels, logits[deployed.key].argmax(1), out / "parity.png")
    return report


def report_context(run: Path, meta: RunMeta, tgt: Target | None, source: str, m: Measured) -> dict[str, Any]:
    return {"run": str(run), "target": tgt.name if tgt else "none (fp32 export only)", "data": source,
            "samples": len(m.labels), "backbone": meta.backbone,
            "input": f"{meta.input_spec.height}x{meta.input_spec.width} {meta.input_spec.color_order}",
            "deployed latency (batch 1)": f"{m.latency.p50_ms:.2f} ms p50, {m.latency.p99_ms:.2f} ms p99 "
                                          f"({m.deployed.runner.description}, {m.deployed.runner.precision})"}


def held_out_baselines(meta: RunMeta, reference: np.ndarray, labels: np.ndarray) -> dict:
    """The reference (torch fp32) model's accuracy on the validated images next to chance and the
    majority class of the run's train split, measured on these images (`baselines.assess`)."""
    train_counts = (meta.data.get("counts") or {}).get("train") or {}
    found = np.bincount(labels, minlength=len(meta.classes)) if len(labels) else np.zeros(len(meta.classes), int)
    eval_counts = {c: int(n) for c, n in zip(meta.classes, found)}
    accuracy = float((reference.argmax(1) == labels).mean()) if len(labels) else None
    return assess(accuracy, meta.classes, train_counts, eval_counts, split="held-out")


def failing_reports(folder: str | Path) -> list[Path]:
    """The `parity.md` of every parity report under `folder` (a run, a demo folder, any tree) whose
    gates failed, found from the `parity.json` beside it; sorted by path."""
    import json

    found = []
    for path in sorted(Path(folder).rglob("parity.json")):
        try:
            passed = json.loads(path.read_text(encoding="utf-8")).get("passed")
        except (OSError, ValueError, AttributeError):
            continue  # not one of ours (or being written): nothing to point at
        if passed is False:
            found.append(path.with_name("parity.md"))
    return found


def failed_gates(report: str | Path) -> list[str]:
    """'pair: gate' for every failed gate of the parity report `report` (its .md or .json path)."""
    import json

    data = json.loads(Path(report).with_name("parity.json").read_text(encoding="utf-8"))
    return [f"{p['pair']}: {f}" for p in data.get("pairs", []) for f in p.get("failures", [])]


def deployed_summary(reference: np.ndarray, deployed: np.ndarray, labels: np.ndarray, precision: str) -> dict:
    """The headline numbers a person asks first: accuracy before/after and agreement with torch, each
    with what the split resolves (95 % intervals, one image in points: `evidence`)."""
    pair = compare("deployed vs torch fp32", Side("torch", "fp32"), Side("deployed", precision), reference, deployed,
                   labels, Gates(min_agreement=None, max_abs_diff=None))
    return {"precision": precision, "samples": pair.samples, "fp32_accuracy": pair.reference_accuracy,
            "accuracy": pair.candidate_accuracy, "drop": pair.accuracy_drop,
            "drop_interval": pair.drop_evidence["interval"] if pair.drop_evidence else None,
            "agreement": pair.agreement, "agreement_interval": [round(v, 6) for v in pair.agreement_interval],
            "min_cosine": pair.min_cosine, "image_points": pair.image_points}


def pair_keys(sides: dict[str, _Side], tgt: Target | None) -> list[tuple[str, str]]:
    keys = [("torch", "onnx")]
    if tgt is not None:
        lowered = "qdq" if "qdq" in sides else "compiled"
        if tgt.precision != "fp32":
            keys.append(("torch", lowered))
        keys.append(("qdq" if "qdq" in sides else "onnx", "compiled"))
    return keys


def _pairs(sides: dict[str, _Side], logits: dict[str, np.ndarray], labels: np.ndarray,
           tgt: Target | None, run: Path | None = None) -> list[PairReport]:
    names = {("torch", "onnx"): "export fidelity: torch fp32 vs ONNX fp32",
             ("torch", "qdq"): "quantization effect: torch fp32 vs INT8 QDQ (ONNX Runtime)",
             ("torch", "compiled"): f"precision effect: torch fp32 vs compiled {tgt.precision if tgt else ''}",
             ("qdq", "compiled"): "compiler fidelity: INT8 QDQ (ONNX Runtime) vs compiled",
             ("onnx", "compiled"): "compiler fidelity: ONNX fp32 (ONNX Runtime) vs compiled"}
    out = []
    for a, b in pair_keys(sides, tgt):
        if tgt is None:
            gates = FP32_GATES
        elif a == "torch" and b == "onnx":
            gates = tgt.gates.export.gates()
        elif a == "torch":
            gates = tgt.gates.quantization.gates()
        else:
            gates = tgt.gates.compiler.gates()
        report = compare(names[(a, b)], sides[a].side(), sides[b].side(), logits[a], logits[b], labels, gates)
        if report.failures:
            report.advice = pair_advice((a, b), report, tgt, run)
        out.append(report)
    return out


def pair_advice(pair: tuple[str, str], report: PairReport, tgt: Target | None, run: Path | None = None) -> list[str]:
    """What to try next when `report` failed a gate: concrete commands, most promising first.

    `pair`: the sides' keys (torch/onnx/qdq/compiled). For the quantization pair the advice reads
    what `quantize` recorded (RUN/<target>/quantization.json) to say which knob is left to turn.
    """
    name = tgt.name if tgt else "TARGET"
    out: list[str] = []
    if pair == ("torch", "onnx"):
        out.append("the ONNX export itself differs from torch: validate without --target to see it alone, and "
                   "re-export with another opset (`edgetransfer export RUN --opset 17`)")
    elif pair == ("torch", "qdq") and tgt is not None and tgt.quantization is not None:
        q = tgt.quantization
        record = _read_quantization(run, tgt)
        if record and record.get("within_gates"):
            if any(f.startswith("accuracy drop") for f in report.failures):
                out.append(_unseen_drop(record, report))
            agreement_failed = any(f.startswith("top-1 agreement") for f in report.failures)
            if record.get("min_agreement") is not None and agreement_failed:
                out.append(f"`quantize` met the gates on its {record.get('agreement_samples')} val + calibration "
                           f"images (agreement {record.get('agreement', 0):.4f}) but the {report.samples} test images "
                           "disagree more: the val/train images may not represent the test images; add val images "
                           "like them")
        out.append(f"calibrate differently: `edgetransfer quantize RUN --target {name} --calib percentile` "
                   f"(or --calib entropy); used: {q.calibration}")
        other = "nncf" if (record or {}).get("quantizer", q.quantizer) != "nncf" else "onnxruntime"
        out.append(f"another quantizer: `edgetransfer quantize RUN --target {name} --quantizer {other}`")
        layers = len((record or {}).get("excluded_layers") or [])
        out.append(f"allow more layers in fp32: `edgetransfer quantize RUN --target {name} --max-fallback-layers "
                   f"{max(2 * q.max_fallback_layers, 4)}` ({layers} kept now, at most {q.max_fallback_layers})")
        out.append(f"then `edgetransfer compile RUN --target {name}` and validate again")
    elif pair[0] == "torch":
        out.append(f"the {tgt.precision if tgt else ''} model moved too far from fp32: try the INT8 or fp32 profile "
                   "of the same device, or validate on a device whose precision units the profile names")
    else:  # compiler fidelity: the runtime changed the function of the file it was given
        out.append("the runtime did not run the function of the file it compiled: check the candidate precision "
                   "in the table (bf16/fp16 where fp32 was asked means a precision hint was ignored)")
        if tgt is not None and tgt.quantization is not None and tgt.quantization.activations != "symmetric":
            out.append("quantize with signed, symmetric activations (quantization.activations: symmetric in a copy "
                       f"of the profile: `edgetransfer targets show {name} > my.yaml`, then --target my.yaml); "
                       "unsigned asymmetric activations are where CPU INT8 kernels differ most")
        out.append("report the model and CPU (`lscpu`) to the project: a compiler gate is not loosened to pass")
    if tgt is not None and report.gates.min_agreement is not None and report.gates.min_agreement < 1.0:
        needed = int(np.ceil(1.0 / (1.0 - report.gates.min_agreement)))
        if report.samples < needed:
            out.append(f"more test images: on {report.samples} images one disagreement is "
                       f"{1.0 / report.samples:.3f} of agreement; the {report.gates.min_agreement} gate needs "
                       f"{needed} or more to tell a model that misses it from one unlucky image (--data DIR)")
    return out


def _unseen_drop(record: dict, report: PairReport) -> str:
    """Why the test split saw an accuracy drop that `quantize`'s search, within its gates, did not."""
    n, budget, seen = record.get("validation_samples") or 0, record.get("budget"), record.get("drop", 0.0)
    images = round((report.accuracy_drop or 0.0) * report.samples / 100.0)
    said = (f"`quantize` saw a drop of {seen:.2f} points on its {n} validation images; on the {report.samples} test "
            f"images it is {report.accuracy_drop:.2f} points ({images} image{'s' if images != 1 else ''} net)")
    if n and budget is not None and 100.0 / n > budget:
        return (f"{said}. On {n} images one image is {100.0 / n:.2f} points, coarser than the {budget}-point budget: "
                f"the search could not see a drop this size. Add labelled images to val/ (at least "
                f"{int(np.ceil(100.0 / budget))} for one image to count less than the budget), then quantize again")
    return f"{said}: the validation images may not represent the test images; add val images like them"


def _read_quantization(run: Path | None, tgt: Target) -> dict | None:
    import json

    path = None if run is None else target_dir(Path(run), tgt) / "quantization.json"
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def batch_tolerance(tgt: Target | None) -> float:
    """Batch size may change kernels (and INT8 rounding) slightly; fp32 ONNX must be near-identical."""
    if tgt is None or tgt.precision == "fp32":
        return 1e-4
    return 5e-2
