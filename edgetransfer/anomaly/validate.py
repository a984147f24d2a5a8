"""The validate stage for an anomaly run: `validate.measure_sides` runs every side on the held-out
images; this judges their scores (`parity.compare_scores`) and writes parity.json / parity.md /
parity.png (score histograms of good vs defective parts per side) where a classifier's would go, and
parity_maps.png: the images the deployed model disagrees with fp32 about most, each with both maps, so
a person can see *where* INT8 moved the score, not only by how much."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.folder import Sample
from ..evidence import wilson
from ..fsutil import write_json, write_text
from ..parity import FP32_GATES, Gates
from ..spec import RunMeta, anomaly_outputs
from ..stages import target_dir
from ..targets import Target
from ..validate import Measured, batch_tolerance, pair_keys, report_context
from .fit import good_index, per_type_auroc
from .metrics import NORMALISED_THRESHOLD, auroc, finite_or_none
from .parity import ScoreParityReport, compare_scores

log = logging.getLogger(__name__)

_NAMES = {("torch", "onnx"): "export fidelity: torch fp32 vs ONNX fp32",
          ("torch", "qdq"): "quantization effect: torch fp32 vs INT8 QDQ (ONNX Runtime)",
          ("torch", "compiled"): "precision effect: torch fp32 vs compiled",
          ("qdq", "compiled"): "compiler fidelity: INT8 QDQ (ONNX Runtime) vs compiled",
          ("onnx", "compiled"): "compiler fidelity: ONNX fp32 (ONNX Runtime) vs compiled"}


def _gates(pair: tuple[str, str], tgt: Target | None) -> Gates:
    if tgt is None:
        return Gates(min_agreement=1.0, max_abs_diff=FP32_GATES.max_abs_diff, max_accuracy_drop=0.0,
                     min_cosine=0.9999)
    if pair == ("torch", "onnx"):
        return tgt.gates.export.gates()
    if pair[0] == "torch":
        return tgt.gates.quantization.gates()
    return tgt.gates.compiler.gates()


#: how many of the worst disagreements parity_maps.png shows
WORST = 5


def worst_disagreements(reference: np.ndarray, deployed: np.ndarray, count: int = WORST) -> list[int]:
    """Indices of the images to look at first: those on different sides of the threshold, then the
    largest |Δscore|; each group by |Δscore|, largest first."""
    flipped = (reference >= NORMALISED_THRESHOLD) != (deployed >= NORMALISED_THRESHOLD)
    delta = np.abs(reference - deployed)
    order = np.lexsort((-delta, ~flipped))
    return [int(i) for i in order[:count]]


def _map_figure(m: Measured, samples: Sequence[Sample], chosen: list[int], meta: RunMeta, path: Path) -> Path | None:
    """Reference (top row) and deployed (bottom row) maps over the `chosen` images, run again through
    the same two runners on just those images."""
    from ..stages import iter_batches
    from .plots import map_overlays, pictures

    ref, dep = m.outputs["torch"], m.outputs[m.deployed.key]
    x, _ = next(iter_batches([samples[i] for i in chosen], meta.input_spec, len(chosen), description="maps"))
    maps = {}
    for key in ("torch", m.deployed.key):
        with m.sides[key].runner as runner:
            out = runner.infer_outputs(x)
        maps[key] = anomaly_outputs(out)[1]
    if any(v is None for v in maps.values()):
        log.info("a side returned no anomaly map: %s not drawn", path)
        return None
    views = pictures(x, meta.input_spec)
    names = [meta.classes[samples[i].label] for i in chosen]
    titles = [f"{n}: fp32 {ref[i]:.2f}" for n, i in zip(names, chosen)]
    titles += [f"{n}: {m.deployed.runner.precision.split(' ')[0]} {dep[i]:.2f}" for n, i in zip(names, chosen)]
    return map_overlays(views + views, list(maps["torch"]) + list(maps[m.deployed.key]), titles, path,
                        columns=len(chosen))


def score_report(run: Path, meta: RunMeta, tgt: Target | None, m: Measured, source: str,
                 samples: Sequence[Sample]) -> ScoreParityReport:
    good = good_index(meta.classes, meta.anomaly.get("good", "ok"))
    anomalous = m.labels != good
    scores, deployed = m.outputs, m.deployed
    pairs = []
    for a, b in pair_keys(m.sides, tgt):
        pairs.append(compare_scores(_NAMES[(a, b)], m.sides[a].side(), m.sides[b].side(), scores[a], scores[b],
                                    anomalous, _gates((a, b), tgt)))
    pairs.append(compare_scores(f"dynamic batch: {deployed.runner.description} batch 1 vs {m.batch_max}",
                                deployed.side(f" batch {m.batch_max}"), deployed.side(" batch 1"),
                                m.batched, m.single, None,
                                Gates(min_agreement=1.0, max_abs_diff=batch_tolerance(tgt) / NORMALISED_THRESHOLD)))
    for p in pairs:
        if p.failures and p.pair.startswith("quantization") and tgt is not None:
            p.advice = [f"keep more of the backbone in fp32: `edgetransfer quantize RUN --target {tgt.name} "
                        f"--max-fallback-layers N`", "another quantizer: `--quantizer nncf` or `--quantizer onnxruntime`",
                        "calibrate on more good images (`--calib default`), then compile and validate again"]
    ref, dep = scores["torch"], scores[deployed.key]
    types = {name: {"reference": value, "deployed": per_type_auroc(dep, m.labels, meta.classes, good)[name]}
             for name, value in per_type_auroc(ref, m.labels, meta.classes, good).items()}
    summary: dict[str, Any] = {
        "precision": deployed.runner.precision, "task": "anomaly", "good": meta.classes[good],
        "fp32_auroc": finite_or_none(auroc(ref, anomalous)), "auroc": finite_or_none(auroc(dep, anomalous)),
        "decision_agreement": float(((ref >= NORMALISED_THRESHOLD) == (dep >= NORMALISED_THRESHOLD)).mean()),
        "agreement_interval": list(wilson(int(((ref >= NORMALISED_THRESHOLD) == (dep >= NORMALISED_THRESHOLD)).sum()),
                                          len(ref))),
        "samples": int(len(ref)),
        "decision_accuracy": float(((dep >= NORMALISED_THRESHOLD) == anomalous).mean()),
        "auroc_per_type": types, "threshold": meta.anomaly.get("threshold")}
    report = ScoreParityReport(classes=meta.classes, pairs=pairs, context=report_context(run, meta, tgt, source, m),
                               latency=m.latency.to_dict(), summary=summary)
    report.context["task"] = f"anomaly: good class '{meta.classes[good]}', every other class defective"
    worst = worst_disagreements(ref, dep)
    report.context["worst disagreements (parity_maps.png)"] = "; ".join(
        f"{samples[i].path.parent.name}/{samples[i].path.name} {ref[i]:.3f} -> {dep[i]:.3f}" for i in worst)
    if tgt is not None:
        from ..stages import checked_artifact_files

        report.artifact_files = checked_artifact_files(run, tgt)
    out = target_dir(run, tgt) if tgt else run
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "parity.json", report.to_dict())
    write_text(out / "parity.md", report.to_markdown())
    from .plots import score_histograms

    score_histograms({m.sides[k].runner.description + f" ({m.sides[k].runner.precision})": v
                      for k, v in scores.items()}, anomalous, out / "parity.png")
    _map_figure(m, samples, worst, meta, out / "parity_maps.png")
    return report


__all__ = ["score_report", "worst_disagreements"]
