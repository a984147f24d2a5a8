"""The per-target stages on a run folder: quantize (calibrate → QDQ ONNX) and compile (→ device artifact).

Everything a stage needs is on disk in the run folder (meta, exported ONNX, the target profile it
copies next to its artifacts), so each stage can be run alone, re-run or resumed. Outputs for a
target live in `RUN/<target>/`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .data.calibration import select_calibration
from .data.folder import DatasetSplits, Sample, dataset_hash, scan_dataset
from .errors import DependencyError, GateFailed, IntegrityError, UsageError
from .backends.base import KIT_FILE
from .export import ONNX_FILE
from .fsutil import sha256_file, write_json, write_text
from .onnxfile import check_onnx_file
from .preprocess import load_image, preprocess
from .progress import progress_bar
from .schema import to_dict
from .spec import InputSpec, RunMeta
from .targets import Target, load_calibration, load_target

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
COMPILED_FILE = "compiled.json"
CHECK_FILE = "check.json"
CHECK_MD = "check.md"


def as_target(target: str | Path | Target) -> Target:
    return target if isinstance(target, Target) else load_target(target)


def target_dir(run: Path, target: Target) -> Path:
    return Path(run) / target.name


def run_splits(meta: RunMeta) -> DatasetSplits:
    """The run's dataset, split exactly as during training (same root, seed and fractions)."""
    root = meta.data.get("root")
    if not root or not Path(root).exists():
        raise UsageError(f"the run's dataset is not at its recorded location {root!r}; pass --data DIR",
                         field="data.root")
    splits = split_like_run(root, meta)
    if dataset_hash(splits) != meta.data.get("hash"):
        log.warning("dataset at %s changed since training (hash differs)", root)
    return splits


def split_like_run(root: str | Path, meta: RunMeta) -> DatasetSplits:
    """The images under `root`, split and filtered as the run's were (its classes, seed, fractions and
    skipped files): their `dataset_hash` equals the run's recorded one exactly when nothing changed."""
    return scan_dataset(root, classes=meta.classes, seed=meta.data.get("seed", 0),
                        val_fraction=meta.data.get("val_fraction", 0.15),
                        test_fraction=meta.data.get("test_fraction", 0.15), verify=False,
                        exclude=meta.data.get("skipped", []), held_out_classes=meta.task == "anomaly")


def iter_batches(samples: Sequence[Sample], spec: InputSpec, batch_size: int, *,
                 description: str = "preprocessing") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Samples → (NCHW float32 batch, labels), via the deployment preprocessing, with a progress bar."""
    for i in progress_bar(range(0, len(samples), batch_size), description, total=-(-len(samples) // batch_size)):
        chunk = samples[i:i + batch_size]
        yield np.stack([preprocess(load_image(s.path), spec) for s in chunk]), np.array([s.label for s in chunk])


def load_arrays(samples: list[Sample], spec: InputSpec, *, batch_size: int = 32,
                description: str = "preprocessing") -> list[np.ndarray]:
    """All of `iter_batches`' input batches, in memory (calibration and validation sets)."""
    return [x for x, _ in iter_batches(samples, spec, batch_size, description=description)]


@dataclass
class QuantizeResult:
    model: Path
    report: Any  # quantize.QuantizationReport
    calibration: dict[str, Any]


def quantize_run(run: str | Path, target: str | Path | Target, *, calib: str | Path | None = None,
                 quantizer: str | None = None, max_fallback_layers: int | None = None,
                 compiler_in_loop: bool = True) -> QuantizeResult:
    """Calibrate on train/val images (never test) and write `RUN/<target>/model.int8.onnx`.

    Also writes `calibration.json` (every image used, with its sha256) and `quantization.json` (the
    quantizers tried, accuracy and agreement before/after, each layer kept in fp32 to meet the
    target's quantization gates, and what to try next when they are missed). `quantizer` and
    `max_fallback_layers` override the profile's (the `target.yaml` written records what ran).
    `compiler_in_loop`: where the target's backend runs here, compile and run every candidate so the
    search meets the compiler-fidelity gates too (`compiler_check`).
    """
    import dataclasses

    from .quantize import quantize_model

    run, tgt = Path(run), as_target(target)
    if tgt.quantization is None:
        raise UsageError(f"target {tgt.name} is {tgt.precision}; it has no quantization step", field="precision")
    overrides = {k: v for k, v in {"quantizer": quantizer, "max_fallback_layers": max_fallback_layers}.items()
                 if v is not None}
    if overrides:
        tgt = dataclasses.replace(tgt, quantization=dataclasses.replace(tgt.quantization, **overrides))
    meta = RunMeta.load(run / "meta.json")
    fp32 = run / ONNX_FILE
    if not fp32.exists():
        raise UsageError("no exported model; run `edgetransfer export` first", path=fp32)
    check_onnx_file(fp32)
    from .backends import get_backend

    with get_backend("onnxruntime").load(fp32):  # calibration runs it: a model ONNX Runtime refuses is exit 4,
        pass                                     # before anything is written to the target folder
    preset = load_calibration(calib or tgt.quantization.calibration)
    splits = run_splits(meta)
    chosen = select_calibration(splits, preset)
    if not chosen.samples:
        raise UsageError("no calibration images in the train/val splits", path=splits.root)
    out = target_dir(run, tgt)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "target.yaml", _yaml(to_dict(tgt)))
    write_json(out / "calibration.json", chosen.record)
    calibration = load_arrays(chosen.samples, meta.input_spec, description="calibration images")
    val = load_arrays(splits.val, meta.input_spec, description="validation images")
    labels = np.array([s.label for s in splits.val])
    # agreement needs no labels: measured on every image the run may look at (never test): the
    # validation images the search always measures, plus the train images (calibration draws from
    # both), thinned to AGREEMENT_IMAGES; the search aims past the gate on these
    task: dict[str, Any] = {}
    if meta.task != "anomaly":
        task["agreement_images"] = _agreement_images(splits.train, meta.input_spec)
    else:  # judged by AUROC and decisions; the distances to the bank stay fp32
        from .anomaly.deploy import float_nodes, score_metric
        from .anomaly.fit import good_index

        good = good_index(meta.classes, meta.anomaly.get("good", "ok"))
        labels = (labels != good).astype(np.int64)
        fitted = {s.path for s in splits.train if s.label == good}  # in the bank: every model agrees there
        unseen = [s for s in chosen.samples if s.path not in fitted]
        task = {"metric": score_metric(labels.astype(bool)), "float_nodes": float_nodes(fp32),
                "agreement_images": load_arrays(unseen, meta.input_spec, description="agreement images")
                if unseen else []}
        compiler_in_loop = False  # the compiler check compares logits; validate compares the compiled scores
    report = quantize_model(fp32, out / INT8_FILE, scheme=tgt.quantization, preset=preset,
                            calibration=calibration, validation=(np.concatenate(val), labels),
                            gates=tgt.gates.quantization, compiler=compiler_check(tgt) if compiler_in_loop else None,
                            **task)
    write_json(out / "quantization.json", report.to_dict())
    return QuantizeResult(model=out / INT8_FILE, report=report, calibration=chosen.record)


#: at most this many train images judge agreement in the quantization search besides val (a classifier's run)
AGREEMENT_IMAGES = 1000


def _agreement_images(samples: Sequence[Sample], spec: InputSpec) -> list[np.ndarray]:
    """Every image of `samples`, or AGREEMENT_IMAGES of them evenly spaced (the lists are ordered by class)."""
    if len(samples) > AGREEMENT_IMAGES:
        pick = np.unique(np.linspace(0, len(samples) - 1, AGREEMENT_IMAGES).astype(int))
        samples = [samples[i] for i in pick]
    return load_arrays(samples, spec, description="agreement images") if samples else []


def compiler_check(target: Target) -> Any:
    """The target's compiler for `quantize_model` (a `quantize.CompilerCheck`), or None where its
    backend cannot run here (TensorRT off the device: `validate` there measures compiler fidelity) or
    the profile gates nothing on it.

    Each call compiles the candidate into a temporary folder with the same `Backend.compile` that
    `compile` uses, then runs it in batches no larger than the profile's batch range allows.
    """
    import tempfile

    from .quantize import CompilerCheck

    gates = target.gates.compiler.gates()
    if gates.min_agreement is None and gates.min_cosine is None and gates.max_abs_diff is None:
        return None
    backend = target_backend(target, require=False)
    reason = backend.available()
    if reason is not None:
        log.info("compiler fidelity is not part of the quantization search: %s (validate on the device measures it)",
                 reason)
        return None
    batch = max(1, target.batch.max)

    def run(qdq: Path, arrays: Sequence[np.ndarray]) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="edgetransfer-compile-") as tmp:
            artifact = backend.compile(qdq, target, Path(tmp))
            with backend.load(artifact, target) as runner:
                return np.concatenate([runner.infer(np.ascontiguousarray(a[i:i + batch], dtype=np.float32))
                                       for a in arrays for i in range(0, len(a), batch)])

    return CompilerCheck(name=f"{target.backend} {target.device}", gates=gates, run=run)


def compiled_input(run: Path, target: Target) -> Path:
    """The ONNX a target compiles from: the QDQ model for INT8 targets, else the fp32 export."""
    src = target_dir(run, target) / INT8_FILE if target.quantized else Path(run) / ONNX_FILE
    if not src.exists():
        step = f"edgetransfer quantize {run} --target {target.name}" if target.quantized else f"edgetransfer export {run}"
        raise UsageError(f"missing; run `{step}` first", path=src)
    check_onnx_file(src)
    return src


def target_backend(target: Target, *, require: bool = True) -> Any:
    """The target's backend; with `require`, a DependencyError (exit 3) when it cannot run here."""
    from .backends import get_backend

    return get_backend(target.backend, require=require)


@dataclass
class CheckResult:
    report: Any              # the backend's preflight report (to_dict / to_markdown / passed)
    model: Path              # the ONNX that was checked
    folder: Path             # where check.json and check.md are


def check_run(run: str | Path, target: str | Path | Target) -> CheckResult:
    """The target backend's preflight on the ONNX it would compile, written to `RUN/<target>/check.*`.

    Runs anywhere (no TensorRT needed). Before `quantize` an INT8 target is checked on the fp32 export,
    and the report says the INT8 checks are still to come.
    """
    run, tgt = Path(run), as_target(target)
    try:
        src = compiled_input(run, tgt)
    except UsageError:
        if not tgt.quantized or not (run / ONNX_FILE).exists():
            raise
        src = run / ONNX_FILE
        check_onnx_file(src)
    backend = target_backend(tgt, require=False)
    report = backend.preflight(src, tgt)
    if report is None:
        raise UsageError(f"{tgt.backend} targets have no preflight: `edgetransfer compile {run} --target "
                         f"{tgt.name}` builds and checks them here", field="backend")
    return _write_check(target_dir(run, tgt), report, src)


def _write_check(out: Path, report: Any, src: Path) -> CheckResult:
    write_json(out / CHECK_FILE, {**report.to_dict(), "checked": src.name})
    write_text(out / CHECK_MD, report.to_markdown())
    return CheckResult(report=report, model=src, folder=out)


def compile_run(run: str | Path, target: str | Path | Target, *, allow_failed: bool = False) -> Path:
    """Build the target's artifact in `RUN/<target>/` with the target's backend; return its path.

    An INT8 file whose `quantize` missed the target's quantization gates (`quantization.json`:
    `within_gates` false) is refused (exit 1) unless `allow_failed`: quantize keeps that file for
    inspection, not for shipping. A backend with a preflight checks first (exit 1 when the model
    cannot build). Where the backend cannot run here but has an on-device build kit (TensorRT), the
    kit is written and the error (exit 3) says where it is.
    """
    run, tgt = Path(run), as_target(target)
    src = compiled_input(run, tgt)
    if tgt.quantized and not allow_failed:
        _refuse_failed_quantization(run, tgt, src)
    backend = target_backend(tgt, require=False)
    out = target_dir(run, tgt)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "target.yaml", _yaml(to_dict(tgt)))
    report = backend.preflight(src, tgt)
    if report is not None:
        _write_check(out, report, src)
        if not report.passed:
            raise GateFailed(f"{src.name} cannot build for {tgt.name}: {report.errors[0].message} "
                             f"({len(report.errors)} error(s); see {out / CHECK_MD})", path=src)
    reason = backend.available()
    if reason is not None:
        instructions = backend.build_kit(src, tgt, out, reason=reason, preflight=report)
        if instructions is None:
            raise DependencyError(f"target {tgt.name} needs the {tgt.backend} backend: {reason}", field="backend")
        raise DependencyError(f"{reason}, so {tgt.name}'s {tgt.backend} artifact is built on the device. Wrote the "
                              f"on-device build kit to {out}: copy the run folder there and follow {instructions}")
    artifact = backend.compile(src, tgt, out)
    write_json(out / COMPILED_FILE, {"artifact": artifact.name, "backend": tgt.backend, "device": tgt.device,
                                     "precision": tgt.precision, "source": src.name, "source_sha256": sha256_file(src),
                                     "files": file_hashes(out, backend.artifact_files(artifact))})
    log.info("compiled %s for %s → %s", src.name, tgt.name, artifact)
    return artifact


def _refuse_failed_quantization(run: Path, tgt: Target, src: Path) -> None:
    record = target_dir(run, tgt) / "quantization.json"
    try:
        quantization = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return  # an INT8 file made elsewhere: validate judges it
    except (OSError, ValueError) as exc:
        raise UsageError(f"unreadable quantization record: {exc}", path=record) from exc
    if isinstance(quantization, dict) and quantization.get("within_gates") is False:
        missed = "; ".join(quantization.get("advice") or [])[:400]
        raise GateFailed(f"{src.name} missed {tgt.name}'s quantization gates when it was quantized (drop "
                         f"{quantization.get('drop')} points, agreement {quantization.get('agreement')}); it is kept "
                         f"for inspection, not compiled. Quantize again (what to try: {missed or 'see quantize'}), "
                         f"or compile it anyway with --allow-failed", path=src)


def file_hashes(folder: Path, files: Sequence[Path]) -> dict[str, str]:
    """sha256 of each file, keyed by its path relative to `folder` (POSIX separators)."""
    return {Path(f).relative_to(folder).as_posix(): sha256_file(f) for f in files}


def checked_artifact_files(run: Path, target: Target) -> dict[str, str]:
    """The compiled artifact's files as `compile` recorded them; exit 4 when one changed since.

    What validate measured and what bundle ships must be the bytes compile wrote: an artifact edited
    in place (same size, same name) would otherwise be validated by nothing and shipped with golden
    outputs computed from the edited file.
    """
    folder = target_dir(run, target)
    record_path = folder / COMPILED_FILE
    recorded = json.loads(record_path.read_text()).get("files")
    if not isinstance(recorded, dict) or not recorded:
        raise UsageError(f"compiled before edgetransfer recorded the artifact's hashes; run `edgetransfer compile "
                         f"{run} --target {target.name}` again", path=record_path)
    artifact = compiled_artifact(run, target)
    files = target_backend(target, require=False).artifact_files(artifact)
    for f in files:
        if not Path(f).is_file():
            raise UsageError("artifact file missing; compile again", path=f)
    now = file_hashes(folder, files)
    for name in sorted(set(recorded) | set(now)):
        if recorded.get(name) != now.get(name):
            what = "is missing" if name not in now else ("is not part of what compile wrote" if name not in recorded
                                                         else "changed since compile wrote it (sha256 differs)")
            raise IntegrityError(f"{what}; compile again, then validate", path=folder / name)
    return now


def compiled_artifact(run: Path, target: Target) -> Path:
    """The artifact `compile_run` recorded for this target."""
    folder = target_dir(run, target)
    record = folder / COMPILED_FILE
    if not record.exists():
        if (folder / KIT_FILE).exists():
            raise DependencyError(f"no engine for {target.name} here: it is built on the device from the kit in "
                                  f"{folder} ({KIT_FILE} lists it), then validated there", path=folder)
        raise UsageError(f"not compiled yet; run `edgetransfer compile {run} --target {target.name}`", path=record)
    return folder / json.loads(record.read_text())["artifact"]


def load_compiled(run: Path, target: Target) -> Any:
    """A runner for the target's compiled artifact.

    When there is one, the backend inspects it before anything else (an engine built for another
    device is exit 3 naming both sides, a tampered one exit 4), then must be usable here (exit 3).
    """
    if not (target_dir(run, target) / COMPILED_FILE).exists():
        target_backend(target)  # a missing runtime or device is the first thing to say
    artifact = compiled_artifact(run, target)
    recorded = json.loads((target_dir(run, target) / COMPILED_FILE).read_text()).get("source_sha256")
    src = compiled_input(run, target)
    if recorded and sha256_file(src) != recorded:
        raise UsageError(f"{artifact.name} was compiled from an earlier {src.name}; run `edgetransfer compile "
                         f"{run} --target {target.name}` again", path=artifact)
    runner = target_backend(target, require=False).load(artifact, target)
    checked_artifact_files(run, target)  # exit 4 on bytes compile did not write
    target_backend(target)
    return runner


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)

