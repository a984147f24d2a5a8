"""Anomaly detection on the synthetic factory surfaces, measured end to end: AUROC per defect type,
fit time, INT8 parity per target and batch-1 latency of the compiled scorer vs the compiled Lite0
classifier at the same input size.

    python benchmarks/anomaly.py [--out runs/bench-anomaly] [--good 200] [--size 160]

The data is the generator's, with its settings unchanged (seed 2, as the demo): `--good` good
training images, 30 validation and 60 test images per class (good, scratch, hole, stain, crack);
`--data DIR` reuses a folder generated with the same settings.
The threshold is set on the validation split; AUROC is measured on the test split only.
Writes OUT/anomaly_benchmark.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgetransfer.anomaly.fit import fit_anomaly
from edgetransfer.anomaly.patchcore import PatchCoreConfig
from edgetransfer.bench import measure
from edgetransfer.data.synthetic import SyntheticConfig, generate_dataset
from edgetransfer.export import export_module, export_onnx
from edgetransfer.stages import compile_run, load_compiled, quantize_run, target_backend
from edgetransfer.targets import load_calibration, load_target
from edgetransfer.validate import validate


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def classifier_latency(target_name: str, size: int, work: Path, calibration: list[np.ndarray]) -> float:
    """Batch-1 p50 of the Lite0 classifier (5 classes) quantized and compiled for the target the way
    `quantize` + `compile` do it (the weights do not change the latency)."""
    from edgetransfer.backbones import create
    from edgetransfer.quantize import QUANTIZERS

    tgt = load_target(target_name)
    bb = create("efficientnet_lite0", 5, weights="default", img_size=size)
    fp32 = export_module(bb.model.eval(), bb.input_spec, work / "classifier.onnx")
    qdq = work / "classifier.int8.onnx"
    with QUANTIZERS[tgt.quantization.quantizer]() as quantizer:
        quantizer.quantize(fp32, qdq, scheme=tgt.quantization, preset=load_calibration("quick"),
                           calibration=calibration)
    backend = target_backend(tgt)
    artifact = backend.compile(qdq, tgt, work / f"classifier-{target_name}")
    with backend.load(artifact, tgt) as runner:
        return measure(runner, (3, size, size), batch=1, warmup=10, iterations=100, min_seconds=3.0).p50_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-anomaly"))
    parser.add_argument("--good", type=int, default=200, help="good training images (≤ 200 in the issue)")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--targets", nargs="+", default=["intel-cpu", "x86-onnxruntime"])
    parser.add_argument("--data", type=Path, default=None, help="default: OUT/data")
    parser.add_argument("--ignore-border", type=int, default=None, help="override the map cells the score ignores")
    parser.add_argument("--bank-size", type=int, default=None, help="override the bank size")
    parser.add_argument("--fit-only", action="store_true", help="AUROC and fit time only (no INT8, no latency)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = args.out
    data = args.data or out / "data"
    generate_dataset(data, SyntheticConfig(task="defects", size=args.size, seed=2,
                                           counts={"train": args.good, "val": 30, "test": 60}))
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    config = PatchCoreConfig(img_size=args.size)
    if args.ignore_border is not None:
        config = replace(config, ignore_border=args.ignore_border)
    if args.bank_size is not None:
        config = replace(config, bank_size=args.bank_size)
    result = fit_anomaly(data, run, config)
    wall = time.perf_counter() - t0
    m, record = result.meta.metrics, result.meta.anomaly
    rows = []
    if not args.fit_only:
        export_onnx(run)
    calibration = None
    for name in [] if args.fit_only else args.targets:
        quantize_run(run, name)
        compile_run(run, name)
        report = validate(run, target=name)
        q = next(p for p in report.pairs if p.pair.startswith("quantization effect"))
        c = next(p for p in report.pairs if p.pair.startswith("compiler fidelity"))
        tgt = load_target(name)
        with load_compiled(run, tgt) as runner:
            anomaly_ms = measure(runner, (3, args.size, args.size), batch=1, warmup=10, iterations=100,
                                 min_seconds=3.0).p50_ms
        if calibration is None:
            from edgetransfer.stages import load_arrays, run_splits

            calibration = load_arrays(run_splits(result.meta).train[:32], result.meta.input_spec)
        classifier_ms = classifier_latency(name, args.size, out, calibration)
        rows.append({"target": name, "passed": report.passed, "fp32_auroc": report.summary["fp32_auroc"],
                     "deployed_auroc": report.summary["auroc"], "auroc_drop_points": q.auroc_drop,
                     "decision_agreement": q.decision_agreement, "compiler_decision_agreement": c.decision_agreement,
                     "compiler_spearman": c.score_spearman, "per_type": report.summary["auroc_per_type"],
                     "anomaly_b1_p50_ms": anomaly_ms, "classifier_b1_p50_ms": classifier_ms,
                     "latency_ratio": anomaly_ms / classifier_ms})
    summary = {"cpu": cpu_name(), "good_images": args.good, "size": args.size, "fit_seconds": m["fit_seconds"],
               "fit_wall_seconds": round(wall, 3), "bank": record["bank"], "threshold": record["threshold"],
               "config": record["config"], "test_auroc": m["test_auroc"], "per_type": m["test_auroc_per_type"],
               "mean_of_types": m["test_auroc_mean_of_types"], "test_decision_accuracy": m["test_decision_accuracy"],
               "targets": rows}
    (out / "anomaly_benchmark.json").write_text(json.dumps(summary, indent=2))
    print(f"CPU: {summary['cpu']}; {args.good} good images at {args.size} px; fit {m['fit_seconds']:.1f} s; bank "
          f"{record['bank']['patches']} × {record['bank']['dims']} ({record['bank']['bytes'] / 2**20:.2f} MB); "
          f"threshold {record['threshold']['method']}; ignore_border {record['config']['ignore_border']}; "
          f"val AUROC {m['val_auroc']:.4f}")
    print("| defect type | test AUROC (torch fp32) |\n|---|---:|")
    for name, value in m["test_auroc_per_type"].items():
        print(f"| {name} | {value:.4f} |")
    print(f"| **mean of types** | **{m['test_auroc_mean_of_types']:.4f}** |")
    print("\n| target | AUROC fp32 → deployed | drop (pts) | decision agreement | compiler agreement / Spearman | "
          "b1 p50 anomaly / classifier | passed |\n|---|---|---:|---:|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['fp32_auroc']:.4f} → {r['deployed_auroc']:.4f} | {r['auroc_drop_points']:.2f} | "
              f"{r['decision_agreement']:.4f} | {r['compiler_decision_agreement']:.4f} / {r['compiler_spearman']:.5f} | "
              f"{r['anomaly_b1_p50_ms']:.2f} / {r['classifier_b1_p50_ms']:.2f} ms ({r['latency_ratio']:.2f}×) | "
              f"{r['passed']} |")


if __name__ == "__main__":
    main()
