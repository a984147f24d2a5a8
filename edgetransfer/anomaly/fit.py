"""Fit an anomaly run from good images only: a run folder that export, quantize, compile, validate and
bundle take like a classifier's.

The run holds `model.safetensors` (the whole scorer: backbone stages, memory bank, smoothing taps,
score scale) and `meta.json` with `task: anomaly` and the scorer's record (configuration, threshold
and how it was set, bank size and bytes, AUROC per defect type on the test split). Nothing is
written until the scorer is complete, and then the whole folder appears at once (assembled next to
it, renamed into place): a failure (no good class, a bank over its memory bound, NaN features) or a
kill leaves no run behind.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapt.checkpoint import META_FILE, MODEL_FILE, load_weights, save_model
from ..data.folder import DatasetSplits, Sample, dataset_hash, scan_dataset
from ..errors import UsageError
from ..fsutil import temporary_dir, write_json
from ..spec import RESIZE_POLICIES, RunMeta
from ..stages import iter_batches
from .metrics import NORMALISED_THRESHOLD, auroc, choose_threshold, finite_or_none
from .patchcore import PatchCoreConfig, PatchCoreScorer, PatchFeatures, greedy_coreset

log = logging.getLogger(__name__)

#: what `--good` falls back to when the named class is "ok" and the data says "good" (MVTec's name)
GOOD_ALIASES = ("ok", "good")


@dataclass
class AnomalyResult:
    run: Path
    meta: RunMeta


def good_index(classes: list[str], good: str, *, where: Path | str | None = None) -> int:
    """The good class's index; "ok" also finds "good" (and the other way round). Exit 2 when absent."""
    if good in classes:
        return classes.index(good)
    if good in GOOD_ALIASES:
        for alias in GOOD_ALIASES:
            if alias in classes:
                return classes.index(alias)
    raise UsageError(f"no good class {good!r} among the train classes {classes}: an anomaly model is fitted on "
                     f"DATA/train/{good}/ (name it with --good)", path=where, field="good")


def check_config(config: PatchCoreConfig) -> None:
    problems = config.problems()
    if problems:
        raise UsageError("; ".join(problems), field="anomaly")


def _check_out(data: Path, run: Path) -> None:
    data_root, out = data.resolve(), run.resolve()
    if out == data_root or out.is_relative_to(data_root) or data_root.is_relative_to(out):
        raise UsageError(f"the output folder overlaps the dataset {data_root}; pick an --out outside it", path=run)
    if run.exists() and (not run.is_dir() or any(p.name != "edgetransfer.log" for p in run.iterdir())):
        raise UsageError("output exists and is not an empty folder; pick a new --out", path=run)


@torch.no_grad()
def _check_memory(features: PatchFeatures, spec: Any, images: int, config: PatchCoreConfig) -> None:
    """Refuse a bank over `max_bank_mb` or a patch pool over `max_pool_mb` before any image is read."""
    _, dims, h, w = features(torch.zeros(1, 3, spec.height, spec.width)).shape
    if min(h, w) <= 2 * config.ignore_border:
        raise UsageError(f"the feature map is {h}×{w} cells at {spec.height}×{spec.width} px: ignore_border "
                         f"{config.ignore_border} leaves nothing to score; use a larger --img-size",
                         field="ignore_border")
    images *= 2 if _turns(spec, config) else 1
    bank_mb = config.bank_size * dims * 4 / 2**20
    if bank_mb > config.max_bank_mb:
        raise UsageError(f"a bank of {config.bank_size} patches × {dims} features is {bank_mb:.1f} MB, over "
                         f"max_bank_mb {config.max_bank_mb:g}: lower --bank-size or raise the bound",
                         field="bank_size")
    pool_mb = images * h * w * dims * 4 / 2**20
    if pool_mb > config.max_pool_mb:
        raise UsageError(f"the {images} good images give {images * h * w} patches ({pool_mb:.0f} MB) to choose the "
                         f"bank from, over max_pool_mb {config.max_pool_mb:g}: use fewer or smaller images "
                         f"(--img-size), or raise the bound", field="max_pool_mb")


@torch.no_grad()
def _patch_pool(features: PatchFeatures, samples: list[Sample], spec: Any, config: PatchCoreConfig) -> torch.Tensor:
    """Every patch feature of the good training images, (patches, channels)."""
    pool: list[torch.Tensor] = []
    for x, _ in iter_batches(samples, spec, config.batch_size, description="good-part features"):
        batch = torch.from_numpy(x)
        for view in (batch, torch.rot90(batch, 1, (-2, -1))) if _turns(spec, config) else (batch,):
            f = features(view)
            if not torch.isfinite(f).all():
                raise UsageError("the backbone produced NaN or infinite features on the good images (broken "
                                 "weights or images); nothing was written", field="weights")
            pool.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).clone())
    return torch.cat(pool)


def _turns(spec: Any, config: PatchCoreConfig) -> bool:
    """Whether the bank also learns each good image turned by 90° (square inputs only)."""
    return config.rot90 and spec.height == spec.width


@torch.no_grad()
def raw_scores(scorer: PatchCoreScorer, samples: list[Sample], spec: Any, batch_size: int,
               description: str) -> np.ndarray:
    out = [scorer(torch.from_numpy(x))[0].numpy() for x, _ in iter_batches(samples, spec, batch_size, description=description)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def per_type_auroc(scores: np.ndarray, labels: np.ndarray, classes: list[str], good: int) -> dict[str, float]:
    """AUROC of good vs each defect type present (the good images are shared by every row)."""
    out = {}
    for i, name in enumerate(classes):
        if i != good and (labels == i).any() and (labels == good).any():
            keep = (labels == good) | (labels == i)
            out[name] = round(auroc(scores[keep], labels[keep] == i), 6)
    return out


def fit_anomaly(data: str | Path, out: str | Path, config: PatchCoreConfig = PatchCoreConfig()) -> AnomalyResult:
    """Fit PatchCore on DATA/train/<good>/ and write the run folder `out`.

    Other train classes are ignored for fitting (and reported); val and test may hold good and
    defective images (every class but the good one is defective). The threshold is chosen on the
    validation images (best F1 when there are defective ones, else `good_quantile` of good scores);
    AUROC overall and per defect type is measured on the test split.
    """
    from ..backbones import create

    data, run = Path(data), Path(out)
    check_config(config)
    _check_out(data, run)
    t0 = time.perf_counter()
    splits = scan_dataset(data, seed=config.seed, held_out_classes=True)
    good = good_index(splits.classes, config.good, where=data / "train")
    train_good = [s for s in splits.train if s.label == good]
    ignored = sorted({splits.classes[s.label] for s in splits.train if s.label != good})
    if ignored:
        log.info("fitting on %d good images of '%s'; ignoring train classes %s (an anomaly model learns good "
                 "parts only)", len(train_good), splits.classes[good], ignored)
    if not train_good:
        raise UsageError(f"no images in train/{splits.classes[good]}/", path=data / "train")

    torch.manual_seed(config.seed)
    bb = create(config.backbone, 2, weights=config.weights, img_size=config.img_size,
                resize=RESIZE_POLICIES[config.resize])
    spec = bb.input_spec
    features = PatchFeatures(bb.model.eval(), config.layers, config.neighbourhood, pad=config.pad,
                             centre=config.centre).eval()
    _check_memory(features, spec, len(train_good), config)
    pool = _patch_pool(features, train_good, spec, config)
    pool_patches = int(pool.shape[0])
    t_pool = time.perf_counter()
    chosen = greedy_coreset(pool, config.bank_size, dims=config.coreset_dims, seed=config.seed)
    bank = pool[chosen].clone()
    del pool
    t_bank = time.perf_counter()
    scorer = PatchCoreScorer(features, bank, input_size=(spec.height, spec.width), sigma=config.sigma,
                             ignore_border=config.ignore_border).eval()

    val_scores = raw_scores(scorer, splits.val, spec, config.batch_size, "validation scores")
    val_labels = np.array([s.label for s in splits.val])
    if not np.all(np.isfinite(val_scores)):
        raise UsageError("the scorer produced NaN scores on the validation images; nothing was written")
    if not (val_labels == good).any():
        raise UsageError(f"the val split has no '{splits.classes[good]}' images to set the threshold on",
                         path=data, field="val")
    threshold = choose_threshold(val_scores, val_labels != good, good_quantile=config.good_quantile)
    scorer.scale.fill_(threshold.scale)
    fit_seconds = time.perf_counter() - t0

    test_scores = raw_scores(scorer, splits.test, spec, config.batch_size, "test scores") if splits.test else None
    metrics = _metrics(splits, good, val_scores, val_labels, test_scores)
    metrics.update({"fit_seconds": round(fit_seconds, 3), "pool_seconds": round(t_pool - t0, 3),
                    "coreset_seconds": round(t_bank - t_pool, 3)})
    record = {"config": json_config(config), "good": splits.classes[good], "threshold": threshold.to_dict(),
              "bank": {"patches": int(bank.shape[0]), "dims": int(bank.shape[1]), "bytes": int(bank.numel() * 4),
                       "pool_patches": pool_patches},
              "ignored_train_classes": ignored}
    meta = RunMeta(classes=splits.classes, input_spec=spec, backbone=config.backbone, weights=bb.weights,
                   mode="patchcore", task="anomaly", anomaly=record, metrics=metrics, spec_source=bb.spec_source,
                   data={"root": str(data.resolve()), "hash": dataset_hash(splits), "counts": splits.counts(),
                         "seed": config.seed, "val_fraction": splits.record["fractions"]["val"],
                         "test_fraction": splits.record["fractions"]["test"],
                         "skipped": [r["path"] for r in splits.record.get("skipped", [])]},
                   train_config=json_config(config))
    _write_run(run, scorer, meta, splits)
    log.info("anomaly run %s: bank %d × %d (%.2f MB), threshold %.4g (%s), fit %.1f s%s", run, bank.shape[0],
             bank.shape[1], bank.numel() * 4 / 2**20, threshold.raw, threshold.method, fit_seconds,
             "" if test_scores is None else f", test AUROC {metrics['test_auroc']:.4f}")
    return AnomalyResult(run=run, meta=meta)


def _write_run(run: Path, scorer: PatchCoreScorer, meta: RunMeta, splits: DatasetSplits) -> None:
    """All or nothing: the run is assembled in a temporary folder next to `run`, then renamed into place."""
    tmp = temporary_dir(run)
    try:
        write_json(tmp / "split.json", splits.record)
        save_model(tmp, scorer, meta)
        if run.is_dir():  # empty but for a log the CLI may have started there (checked by _check_out)
            for left in run.iterdir():
                shutil.move(str(left), tmp / left.name)
            run.rmdir()
        tmp.rename(run)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _metrics(splits: DatasetSplits, good: int, val_scores: np.ndarray, val_labels: np.ndarray,
             test_scores: np.ndarray | None) -> dict[str, Any]:
    """`test_scores` are normalised (the threshold is 0.5); `val_scores` raw (AUROC does not mind)."""
    out: dict[str, Any] = {"val_auroc": _rounded(auroc(val_scores, val_labels != good)),
                           "val_samples": int(len(val_labels))}
    if test_scores is not None:
        labels = np.array([s.label for s in splits.test])
        types = per_type_auroc(test_scores, labels, splits.classes, good)
        decided = test_scores >= NORMALISED_THRESHOLD
        out.update({"test_auroc": _rounded(auroc(test_scores, labels != good)), "test_auroc_per_type": types,
                    "test_auroc_mean_of_types": round(float(np.mean(list(types.values()))), 6) if types else None,
                    "test_samples": int(len(labels)),
                    "test_decision_accuracy": round(float((decided == (labels != good)).mean()), 6)})
    return out


def _rounded(value: float) -> float | None:
    figure = finite_or_none(value)
    return None if figure is None else round(figure, 6)


def json_config(config: PatchCoreConfig) -> dict[str, Any]:
    d = asdict(config)
    d["layers"] = list(config.layers)
    return d


def load_scorer(run: Path, meta: RunMeta | None = None) -> PatchCoreScorer:
    """Rebuild an anomaly run's scorer from its meta and its weights (strict, sha256-checked)."""
    from ..backbones import create

    run = Path(run)
    meta = meta or RunMeta.load(run / META_FILE)
    record = meta.anomaly
    try:
        cfg = record["config"]
        bank = torch.zeros(int(record["bank"]["patches"]), int(record["bank"]["dims"]))
        layers, neighbourhood, sigma = tuple(int(i) for i in cfg["layers"]), int(cfg["neighbourhood"]), float(cfg["sigma"])
        pad, centre, border = int(cfg["pad"]), bool(cfg["centre"]), int(cfg["ignore_border"])
    except (KeyError, TypeError, ValueError) as exc:
        from ..errors import IntegrityError

        raise IntegrityError(f"the anomaly record is incomplete ({exc})", path=run / META_FILE, field="anomaly") from exc
    bb = create(meta.backbone, 2, weights="none", img_size=meta.input_spec.height)
    scorer = PatchCoreScorer(PatchFeatures(bb.model, layers, neighbourhood, pad=pad, centre=centre), bank,
                             input_size=(meta.input_spec.height, meta.input_spec.width), sigma=sigma,
                             ignore_border=border)
    load_weights(scorer, run / MODEL_FILE, sha256=meta.weights_sha256)
    return scorer.eval()


__all__ = ["AnomalyResult", "fit_anomaly", "good_index", "load_scorer", "per_type_auroc", "raw_scores"]
