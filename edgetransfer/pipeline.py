"""Recipes: train → export → quantize → compile → validate for one or several targets, from one YAML.

The runner only chains the stage functions; each stage's outputs are on disk, a finished training
run with the same settings is reused and an interrupted one resumed, so re-running a recipe after a
failure redoes only what is missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapt.train import TrainConfig, TrainResult, config_record, train
from .data.folder import dataset_hash
from .errors import DataError, DependencyError, GateFailed, UsageError
from .export import ONNX_FILE, export_onnx
from .fsutil import write_json
from .parity import ParityReport
from .schema import from_dict, read_yaml
from .spec import RunMeta
from .stages import as_target, compile_run, quantize_run, split_like_run
from .targets import Target, load_calibration
from .validate import validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    data: str
    out: str
    targets: tuple[str, ...] = ()
    train: TrainConfig = TrainConfig()
    calibration: str | None = None           # overrides each target's calibration preset
    validate_data: str | None = None         # held-out folder; default: the run's test split


def train_or_reuse(data: str | Path, run: Path, config: TrainConfig) -> TrainResult:
    """Reuse a finished run with identical settings on identical images, resume an interrupted one, else train.

    Identical images: the dataset hash the run recorded is the hash of what `data` holds now. The
    settings alone would reuse a model trained before images were added, removed or relabelled, and
    every later stage would report on it as if it were trained on these; such a run is refused (exit 2,
    naming both hashes), never reused and never overwritten.
    """
    config_file = run / "train_config.json"
    same = config_file.exists() and json.loads(config_file.read_text()) == config_record(data, config)
    if same and (run / "meta.json").exists():
        meta = RunMeta.load(run / "meta.json")
        if "test_accuracy" in meta.metrics:
            recorded = meta.data.get("hash")
            try:
                now = dataset_hash(split_like_run(data, meta))
                why = f"dataset hash {str(recorded)[:12]}…, now {now[:12]}…"
            except DataError as exc:  # a class folder added or removed since: it no longer splits the same way
                now, why = None, str(exc)
            if recorded != now:
                raise UsageError(f"{run} was trained on other images than {data} holds now ({why}): it is neither "
                                 "reused nor overwritten; move it away or pick another output folder", path=run)
            log.info("reusing %s (finished with the same settings on the same images)", run)
            history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
            return TrainResult(run=run, meta=meta, history=history)
    return train(data, run, config, resume=same and (run / "checkpoints" / "last.json").exists())


def deploy_target(run: Path, target: str | Path | Target, *, calib: str | None = None,
                  data: str | Path | None = None) -> dict[str, Any]:
    """Quantize (INT8 targets), compile and validate one target; return its summary row.

    A target whose runtime or device is absent here (TensorRT, an Intel GPU/NPU) is reported as
    skipped with the reason instead of failing the whole recipe (for TensorRT, after writing the
    on-device build kit); one whose model cannot build for it is reported as failed.
    """
    tgt = as_target(target)
    row: dict[str, Any] = {"target": tgt.name}
    quantized = None
    try:
        if tgt.quantized:
            quantized = quantize_run(run, tgt, calib=calib).report
            row["quantizer"] = quantized.quantizer
            row["fp32_layers"] = quantized.excluded_layers
        # a model that missed its quantization gates is still compiled and validated, so that its parity
        # report shows where; the row fails all the same (the CLI's `compile` refuses it without --allow-failed)
        compile_run(run, tgt, allow_failed=True)
        report = validate(run, data, target=tgt)
    except DependencyError as exc:  # e.g. TensorRT: the on-device build kit was written instead
        log.warning("%s skipped: %s", tgt.name, exc)
        return {**row, "skipped": str(exc), "passed": None}
    except GateFailed as exc:  # the preflight says the model cannot build for this target
        log.error("%s failed: %s", tgt.name, exc)
        return {**row, "failed": str(exc), "passed": False}
    failures = _failures(report)
    quantize_failed = quantized is not None and not quantized.within_gates
    if quantize_failed:
        failures.insert(0, f"quantize missed the quantization gates on train/val images ({run / tgt.name}/quantization.json)")
    return {**row, **report.summary, "latency_ms": report.latency["p50_ms"], "passed": report.passed and not quantize_failed,
            "report": str(run / tgt.name / "parity.md"), "failures": failures,
            "warnings": list(report.warnings)}


def _failures(report: ParityReport) -> list[str]:
    return [f"{p.pair}: {f}" for p in report.pairs for f in p.failures]


def _near(base: Path, value: str | None, *, yaml_only: bool = False) -> str | None:
    """Paths in a recipe are relative to the recipe file; profile and preset *names* stay names."""
    if value is None or Path(value).is_absolute() or (yaml_only and not value.endswith((".yaml", ".yml"))):
        return value
    return str(base / value)


def run_recipe(path: str | Path) -> dict[str, Any]:
    """Run every stage of the recipe at `path`; the summary is also written to OUT/recipe-summary.json."""
    recipe = from_dict(Recipe, read_yaml(path), source=path)
    base = Path(path).resolve().parent
    # every profile and preset the recipe names must load before training starts, not after it
    targets = [as_target(_near(base, t, yaml_only=True)) for t in recipe.targets]
    calib = _near(base, recipe.calibration, yaml_only=True)
    if calib is not None:
        load_calibration(calib)
    data, out = Path(_near(base, recipe.data)), Path(_near(base, recipe.out))
    validate_data = _near(base, recipe.validate_data)
    result = train_or_reuse(data, out, recipe.train)
    onnx_path = out / ONNX_FILE
    if not onnx_path.exists() or onnx_path.stat().st_mtime < (out / "model.safetensors").stat().st_mtime:
        export_onnx(result.run)
    fp32 = validate(result.run, validate_data)
    rows = [deploy_target(result.run, t, calib=calib, data=validate_data) for t in targets]
    ran = [r for r in rows if r["passed"] is not None]
    # where to look when it failed: each failing parity report and its failed gates
    failing = ([{"target": None, "report": str(out / "parity.md"), "failures": _failures(fp32)}]
               if not fp32.passed else [])
    failing += [{"target": r["target"], "report": r.get("report"), "failures": r.get("failures") or [r.get("failed")]}
                for r in ran if not r["passed"]]
    summary = {"run": str(out), "fp32_export_passed": fp32.passed, "targets": ran,
               "skipped": [r for r in rows if r["passed"] is None],
               "passed": fp32.passed and all(r["passed"] for r in ran), "failing_reports": failing,
               "warnings": list(dict.fromkeys([*fp32.warnings, *(w for r in ran for w in r.get("warnings", []))]))}
    write_json(out / "recipe-summary.json", summary)
    return summary
