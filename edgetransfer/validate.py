"""The validate stage: run the reference and the artifact on held-out images, compare, gate.

Inputs are produced once by the deployment preprocessing and fed to both sides, so a difference in
the report is a difference in the models, never in how they were fed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from .backends import Runner, get_backend
from .data.folder import Sample, dataset_hash, scan_dataset, scan_split
from .errors import UsageError
from .export import ONNX_FILE
from .fsutil import write_json, write_text
from .parity import FP32_GATES, Gates, ParityReport, Side, compare
from .preprocess import load_image, preprocess
from .progress import progress_bar
from .spec import InputSpec, RunMeta

log = logging.getLogger(__name__)


def held_out_samples(meta: RunMeta, data: str | Path | None) -> tuple[list[Sample], str]:
    """The images to validate on, and a description of where they came from.

    Without `data`, the run's own test split is rebuilt from its recorded root, seed and fractions
    (a changed dataset is reported). With `data`: `DIR/test/` if present, else DIR's class folders.
    """
    if data is None:
        root = meta.data.get("root")
        if not root or not Path(root).exists():
            raise UsageError("the run's dataset is not at its recorded location; pass --data DIR", field="data.root")
        splits = scan_dataset(root, classes=meta.classes, seed=meta.data.get("seed", 0),
                              val_fraction=meta.data.get("val_fraction", 0.15),
                              test_fraction=meta.data.get("test_fraction", 0.15))
        if dataset_hash(splits) != meta.data.get("hash"):
            log.warning("dataset at %s changed since training (hash differs); validating on its current test split", root)
        return splits.test, f"{root} (test split of the training data)"
    folder = Path(data)
    if (folder / "test").is_dir():
        folder = folder / "test"
    return scan_split(folder, meta.classes), str(folder)


def _batches(samples: Sequence[Sample], spec: InputSpec, batch_size: int):
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        yield np.stack([preprocess(load_image(s.path), spec) for s in chunk]), np.array([s.label for s in chunk])


def run_pairs(samples: Sequence[Sample], spec: InputSpec, runners: dict[str, Runner], *,
              batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every runner's logits over the samples, fed identical preprocessed batches."""
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    labels = []
    for x, y in progress_bar(_batches(samples, spec, batch_size), "validating",
                             total=-(-len(samples) // batch_size)):
        labels.append(y)
        for name, runner in runners.items():
            outputs[name].append(runner.infer(x))
    return {k: np.concatenate(v) for k, v in outputs.items()}, np.concatenate(labels)


def validate(run: str | Path, data: str | Path | None = None, *, batch_size: int = 16,
             gates: Gates = FP32_GATES) -> ParityReport:
    """Compare torch fp32 with the exported ONNX (ONNX Runtime) on held-out images.

    Writes `RUN/parity.json`, `RUN/parity.md` and `RUN/parity.png`; the caller decides the exit code
    from `report.passed`. Two pairs: export fidelity over the whole set at `batch_size`, and the
    ONNX model at batch 1 against itself at `batch_size` (a graph that only works at the export
    batch size fails here).
    """
    run = Path(run)
    meta = RunMeta.load(run / "meta.json")
    samples, source = held_out_samples(meta, data)
    if not samples:
        raise UsageError("no held-out images to validate on", path=source)
    onnx_path = run / ONNX_FILE
    if not onnx_path.exists():
        raise UsageError("no exported model; run `edgetransfer export` first", path=onnx_path)
    torch_runner = get_backend("torch").load(run)
    ort_runner = get_backend("onnxruntime").load(onnx_path)
    with torch_runner, ort_runner:
        logits, labels = run_pairs(samples, meta.input_spec, {"torch": torch_runner, "onnxruntime": ort_runner},
                                   batch_size=batch_size)
        few = samples[: min(len(samples), 2 * batch_size)]
        single, _ = run_pairs(few, meta.input_spec, {"onnxruntime": ort_runner}, batch_size=1)
        torch_side = Side(torch_runner.description, "fp32")
        ort_side = Side(ort_runner.description, ort_runner.precision)
    pairs = [
        compare("export fidelity: torch vs ONNX", torch_side, ort_side, logits["torch"], logits["onnxruntime"],
                labels, gates),
        compare(f"dynamic batch: ONNX batch {batch_size} vs batch 1", replace(ort_side, name=f"{ort_side.name} batch {batch_size}"),
                replace(ort_side, name=f"{ort_side.name} batch 1"), logits["onnxruntime"][: len(few)],
                single["onnxruntime"], labels[: len(few)], Gates(min_agreement=1.0, max_abs_diff=gates.max_abs_diff)),
    ]
    report = ParityReport(classes=meta.classes, pairs=pairs, context={
        "run": str(run), "data": source, "samples": len(samples), "backbone": meta.backbone,
        "input": f"{meta.input_spec.height}x{meta.input_spec.width} {meta.input_spec.color_order}"})
    write_json(run / "parity.json", report.to_dict())
    write_text(run / "parity.md", report.to_markdown())
    from .plots import parity_figure

    parity_figure(report, {"export fidelity: torch vs ONNX": (logits["torch"], logits["onnxruntime"])},
                  labels, logits["torch"].argmax(1), run / "parity.png")
    return report
