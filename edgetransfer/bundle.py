"""Writing deployment bundles on the workstation: a run's artifact, a golden set and the manifest.

A bundle is what leaves the workstation: the compiled artifact (or TensorRT's on-device build kit),
a small golden set (preprocessed held-out inputs and the outputs the artifact produced for them at
bundle time) and `manifest.json`, which holds the sha256 of every other file, the input spec, the
class list, the target profile, the toolchain, the parity result and how the model was trained.

The format itself (manifest, file checks, safe archive extraction, verification) is `bundleformat`,
which the device runtime imports without this module; its public names are re-exported here for
callers that write and verify in one place. The writer imports the workstation stages only inside
`write_bundle`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import KIT_FILE
from .bundleformat import (GOLDEN_DIR, KIND, MANIFEST, MODEL_DIR, SCHEMA, VerifyResult, bundle_folder, check_files,
                           compare_golden, extract_archive, manifest_bytes, read_manifest, run_batches, unsafe_name,
                           verify_bundle)
from .errors import EdgeTransferError, GateFailed, IntegrityError, UsageError
from .fsutil import atomic_path, sha256_file, temporary_dir
from .parity import Side

log = logging.getLogger(__name__)

DEFAULT_GOLDEN = 32


def _write_archive(folder: Path, final: Path, names: list[str], mtime: int) -> None:
    """A reproducible .tar.gz of `names` (sorted, fixed owner and mode), written atomically."""
    with atomic_path(final) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(names):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = (folder / name).stat().st_size, mtime, 0o644
            with open(folder / name, "rb") as fh:
                tar.addfile(info, fh)




# ---- writing ---------------------------------------------------------------------------------

@dataclass
class BundleResult:
    folder: Path
    archive: Path | None
    manifest: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.manifest["manifest_sha256"]


def _versions(*dists: str) -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in dists:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def _golden_samples(samples: list[Any], n: int) -> list[Any]:
    """Up to `n` samples, round-robin over classes (so every class the held-out set has is in)."""
    by_class: dict[int, list[Any]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    queues = [list(v) for _, v in sorted(by_class.items())]
    chosen: list[Any] = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return chosen


def _parity_record(path: Path, artifact_record: Path, allow_failed: bool,
                   artifact_files: dict[str, str]) -> dict[str, Any]:
    """What validate said about this artifact; refuses a missing, stale or (without allow_failed) failed
    one, and one about other bytes than `artifact_files` (the artifact as compile recorded it) — exit 4."""
    if not path.exists():
        raise UsageError(f"not validated; run `edgetransfer validate RUN --target {path.parent.name}` first", path=path)
    if path.stat().st_mtime < artifact_record.stat().st_mtime:
        raise UsageError("older than the compiled artifact; validate again before bundling", path=path)
    report = json.loads(path.read_text(encoding="utf-8"))
    validated = report.get("artifact_files")
    if not isinstance(validated, dict):
        raise UsageError("does not say which artifact bytes it validated (an older edgetransfer wrote it); "
                         f"run `edgetransfer validate RUN --target {path.parent.name}` again", path=path)
    if validated != artifact_files:
        changed = sorted(n for n in set(validated) | set(artifact_files) if validated.get(n) != artifact_files.get(n))
        raise IntegrityError(f"is about other bytes than the artifact here ({', '.join(changed)} differ); "
                             "validate again before bundling", path=path)
    failures = [f"{p['pair']}: {f}" for p in report["pairs"] for f in p.get("failures", [])]
    if not report["passed"] and not allow_failed:
        raise GateFailed("parity failed for this target (" + "; ".join(failures) + "); fix it, or bundle anyway "
                         "with --allow-failed (the manifest then records the failure)", path=path)
    return {"passed": report["passed"], "allowed_failed": not report["passed"], "failures": failures,
            "warnings": list(report.get("warnings") or []), "baselines": report.get("baselines"),
            "summary": report.get("summary", {}), "latency": report.get("latency"),
            "pairs": [{k: p.get(k) for k in ("pair", "passed", "agreement", "max_abs_diff", "min_cosine",
                                              "reference_accuracy", "candidate_accuracy", "samples")}
                      for p in report["pairs"]]}


def bundle_warnings(parity: dict[str, Any], training_baselines: dict[str, Any] | None) -> list[str]:
    """The warnings a bundle carries to the device: validate's (the freshest evidence on held-out
    images); where validate judged no baselines (a build kit, an older parity.json), training's."""
    from .baselines import warning_of

    if isinstance(parity.get("baselines"), dict) and parity["baselines"].get("beats_baselines") is not None:
        return list(parity.get("warnings") or [])
    warning = warning_of(training_baselines)
    return [] if warning is None else [f"at training: {warning}"]


def write_bundle(run: str | Path, target: Any, out: str | Path, *, data: str | Path | None = None,
                 golden: int = DEFAULT_GOLDEN, archive: bool = False, allow_failed: bool = False,
                 force: bool = False) -> BundleResult:
    """Pack RUN/<target>/'s artifact (or build kit), a golden set and the manifest into folder `out`.

    The folder is assembled in a temporary sibling, checked like `verify` checks it, and renamed into
    place: `out` is either a complete bundle or absent. With `archive`, `out.tar.gz` is written too.
    A target whose parity failed is refused (exit 1) unless `allow_failed`; then the manifest says so.
    """
    from .backends import get_backend
    from .schema import to_dict
    from .spec import RunMeta
    from .stages import COMPILED_FILE, as_target, checked_artifact_files, compiled_artifact, compiled_input, \
        iter_batches, target_backend, target_dir
    from .validate import held_out_samples

    run, out, tgt = Path(run), Path(out), as_target(target)
    if golden < 1:
        raise UsageError("the golden set needs at least one image", field="golden")
    _check_out(out, run, force)
    meta = RunMeta.load(run / "meta.json")
    tdir = target_dir(run, tgt)
    kit_path = tdir / KIT_FILE
    if (tdir / COMPILED_FILE).exists():
        kind = "compiled"
        backend = target_backend(tgt)
        artifact = compiled_artifact(run, tgt)
        sources = [Path(p) for p in backend.artifact_files(artifact)]
        compiled_files = checked_artifact_files(run, tgt)  # exit 4: not the bytes compile wrote
        parity = _parity_record(tdir / "parity.json", tdir / COMPILED_FILE, allow_failed, compiled_files)
        artifact_info: dict[str, Any] = {"kind": kind, "path": f"{MODEL_DIR}/{artifact.name}"}
    elif kit_path.exists():
        kind = "build-kit"
        kit = json.loads(kit_path.read_text(encoding="utf-8"))
        for name in kit.get("files", []):
            if (reason := unsafe_name(name)) is not None:
                raise UsageError(f"file {name!r}: {reason}", path=kit_path, field="files")
        sources = list(dict.fromkeys([kit_path] + [tdir / name for name in kit.get("files", [])]))
        parity = {"passed": None, "note": "not validated here: the engine is built and checked on the device"}
        artifact_info = {"kind": kind, "path": f"{MODEL_DIR}/{KIT_FILE}", "backend_label": kit.get("backend", tgt.backend),
                         "build_command": kit.get("build_command", f"bash {MODEL_DIR}/build_engine.sh")}
    else:
        raise UsageError(f"nothing to bundle: no {COMPILED_FILE} or {KIT_FILE}; run `edgetransfer compile {run} "
                         f"--target {tgt.name}` first", path=tdir)
    for src in sources:
        if not src.is_file():
            raise UsageError("artifact file missing; compile again", path=src)

    samples, source = held_out_samples(meta, data)
    chosen = _golden_samples(samples, golden)
    if not chosen:
        raise UsageError("no held-out images for the golden set", path=source)
    spec = meta.input_spec
    batch = min(tgt.batch.max, len(chosen))
    x, labels = (np.concatenate(a) for a in zip(*iter_batches(chosen, spec, batch, description="golden set")))
    reference_onnx = compiled_input(run, tgt)  # the QDQ model for INT8 targets, else the fp32 export
    with get_backend("onnxruntime").load(reference_onnx) as ref:
        reference = run_batches(ref, x, batch)
        reference_from = f"{reference_onnx.name} in onnxruntime {metadata.version('onnxruntime')}"
    ran_as = None
    if kind == "compiled":
        with backend.load(artifact, tgt) as runner:
            expected = run_batches(runner, x, batch)
            expected_from, ran_as = f"{runner.description} ({runner.precision}) at bundle time", runner.precision
    else:
        expected, expected_from = reference, reference_from

    created = int(time.time())
    tmp = temporary_dir(out)  # a killed bundle's leftover is swept here too
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would follow the bundle into place
        (tmp / MODEL_DIR).mkdir()
        (tmp / GOLDEN_DIR).mkdir()
        names, copied = [], {}  # copied: bundle name -> the artifact file's name in compiled.json
        for src in sources:
            rel = src.relative_to(tdir).as_posix() if src.is_relative_to(tdir) else src.name
            dst = tmp / MODEL_DIR / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            names.append(f"{MODEL_DIR}/{rel}")
            copied[f"{MODEL_DIR}/{rel}"] = rel
        arrays = {"inputs": x.astype(np.float32), "expected": expected.astype(np.float32),
                  "reference": reference.astype(np.float32), "labels": labels.astype(np.int64)}
        for key, arr in arrays.items():
            np.save(tmp / GOLDEN_DIR / f"{key}.npy", arr, allow_pickle=False)
            names.append(f"{GOLDEN_DIR}/{key}.npy")
        artifact_info["files"] = list(copied)
        hashes = {n: sha256_file(tmp / n) for n in names}  # once: for this check and for the manifest
        if kind == "compiled":  # the copies are the bytes compile wrote and validate measured
            for name, rel in copied.items():
                if hashes[name] != compiled_files.get(rel):
                    raise IntegrityError("changed while it was being bundled; compile and validate again",
                                         path=tdir / rel)
        golden_check = compare_golden(meta.task, "golden set: compiled artifact vs its ONNX at bundle time",
                                      Side(reference_from, tgt.precision), Side(expected_from, ran_as or tgt.precision),
                                      reference, expected, None, tgt.gates.compiler.gates())
        if golden_check.failures and not allow_failed:
            raise GateFailed("the golden set misses the compiler gates at bundle time ("
                             + "; ".join(golden_check.failures) + "): the artifact does not answer like the model "
                             "it was compiled from; compile and validate again", path=tdir)
        training_baselines = meta.metrics.get("baselines")
        training_baselines = training_baselines if isinstance(training_baselines, dict) else None
        warnings = bundle_warnings(parity, training_baselines)
        body = {
            "warnings": warnings,
            "schema": SCHEMA, "kind": KIND, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
            "target": to_dict(tgt), "backend": tgt.backend, "precision": tgt.precision, "ran_as": ran_as,
            "artifact": artifact_info, "classes": list(meta.classes), "input_spec": spec.to_dict(),
            "task": meta.task,
            **({"anomaly": {"good": meta.anomaly.get("good"), "threshold": meta.anomaly.get("threshold"),
                            "outputs": ["score", "anomaly_map"]}} if meta.task == "anomaly" else {}),
            "files": {n: {"sha256": hashes[n], "bytes": (tmp / n).stat().st_size} for n in sorted(names)},
            "toolchain": _versions("edgetransfer", "numpy", "pillow", "onnxruntime", "openvino", "nncf", "onnx",
                                   "torch", "torchvision", "tensorrt"),
            "parity": parity,
            "quantization": _quantization_record(tdir / "quantization.json"),
            "training": {"backbone": meta.backbone, "weights": meta.weights, "mode": meta.mode,
                         "data_hash": meta.data.get("hash"), "classes": list(meta.classes),
                         "metrics": {k: v for k, v in meta.metrics.items() if isinstance(v, (int, float, str))},
                         "baselines": training_baselines},
            "golden": {"inputs": f"{GOLDEN_DIR}/inputs.npy", "expected": f"{GOLDEN_DIR}/expected.npy",
                       "reference": f"{GOLDEN_DIR}/reference.npy", "labels": f"{GOLDEN_DIR}/labels.npy",
                       "count": len(chosen), "batch": batch, "source": str(source),
                       "images": [f"{s.path.parent.name}/{s.path.name}" for s in chosen], "expected_from": expected_from,
                       "reference_from": reference_from, "agreement_with_reference": golden_check.agreement,
                       "gates": to_dict(tgt.gates.compiler), "failures": list(golden_check.failures)},
        }
        (tmp / MANIFEST).write_bytes(manifest_bytes(body))
        manifest = read_manifest(tmp)
        check_files(tmp, manifest)  # what we wrote verifies before it takes the final name
        archive_path = Path(f"{out}.tar.gz") if archive else None
        if archive_path is not None:
            _write_archive(tmp, archive_path, [MANIFEST, *names], created)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if parity.get("passed") is False:
        log.warning("WARNING: %s was bundled although its parity FAILED (%s); the manifest records it",
                    tgt.name, "; ".join(parity["failures"]))
    for w in warnings:
        log.warning("WARNING: bundled with a warning (recorded in the manifest): %s", w)
    return BundleResult(folder=out, archive=archive_path, manifest=manifest)


def _check_out(out: Path, run: Path, force: bool) -> None:
    """`--out` may be new, or with `force` a previous bundle; never the run, anything holding it or
    inside it but a bundle, nor any other folder or file (exit 2 naming it)."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UsageError("exists; choose another --out or pass --force to replace a previous bundle", path=out)
    resolved, run_resolved = out.resolve(), run.resolve()
    if out.is_symlink() or not out.is_dir():
        raise UsageError("--force replaces only a previous bundle folder; this is not a folder", path=out)
    if resolved == run_resolved or run_resolved.is_relative_to(resolved):
        raise UsageError(f"--force would delete the run {run} (or a folder holding it); choose another --out", path=out)
    try:  # the format's own reader: a FIFO, a huge or a foreign manifest.json is not a bundle
        read_manifest(out)
    except EdgeTransferError as exc:
        raise UsageError(f"--force replaces only a previous bundle (a folder with an edgetransfer {MANIFEST}); "
                         f"this folder holds something else ({exc})", path=out) from exc


def _quantization_record(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    q = json.loads(path.read_text(encoding="utf-8"))
    return {k: q.get(k) for k in ("quantizer", "fp32_val_accuracy", "int8_val_accuracy", "drop", "within_budget",
                                  "agreement", "min_agreement", "within_gates",
                                  "excluded_layers")}


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place; an old bundle there is moved aside first, then removed."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / "bundle")
    with open(tmp / MANIFEST, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["BundleResult", "VerifyResult", "bundle_folder", "check_files", "extract_archive", "manifest_bytes",
           "read_manifest", "verify_bundle", "write_bundle"]
