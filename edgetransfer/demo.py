"""The main job on the embedded default: offline transfer learning on synthetic factory surfaces.

No pretrained ImageNet weights can be fetched here, so the demo shows transfer honestly: it
pretrains the backbone on a *source* task (generic marks on one set of materials), then adapts it to
the *target* defect task (ok/scratch/hole/stain/crack on other materials) with few labels, and puts
that next to the same network trained on the same few labels from scratch. With network access a
user passes `--weights IMAGENET1K_V1` to `train` instead of pretraining.

Each stage is reused when its run already finished with the same settings and resumed when it was
interrupted, so re-running the demo is cheap and never clobbers anything it did not make.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .adapt.train import TrainConfig
from .data.synthetic import SyntheticConfig, generate_dataset
from .export import export_onnx
from .fsutil import write_json, write_text
from .pipeline import deploy_target, train_or_reuse
from .validate import validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    backbone: str = "resnet18"
    img_size: int = 48
    generated_size: int = 64
    source_per_class: int = 80       # source task: plenty of labels (7 classes)
    source_epochs: int = 8
    target_per_class: int = 30       # target task: few labels (5 classes)
    target_val_per_class: int = 10
    target_test_per_class: int = 40
    target_epochs: int = 10
    targets: tuple[str, ...] = ("intel-cpu", "x86-onnxruntime")
    ship: str = "intel-cpu"          # the target bundled, verified and run through the device runtime
    ship_images: int = 5
    calibration: str = "default"
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        """A smoke run for tests: seconds, not minutes; the numbers mean nothing."""
        return cls(img_size=32, generated_size=48, source_per_class=6, source_epochs=1, target_per_class=4,
                   target_val_per_class=2, target_test_per_class=3, target_epochs=1,
                   calibration="quick")


def run_demo(out: str | Path = "runs/demo", *, config: DemoConfig | None = None, quick: bool = False) -> dict[str, Any]:
    """Generate data, pretrain on the source task, adapt to defects (features and finetune modes),
    train the same network from scratch for comparison, export the best adapted model and validate it.

    Returns the summary (also written to OUT/summary.json and OUT/summary.md).
    """
    cfg = config or (DemoConfig.quick() if quick else DemoConfig())
    out = Path(out)
    t0 = time.perf_counter()
    source_data, target_data = out / "data" / "source", out / "data" / "target"
    generate_dataset(source_data, SyntheticConfig(
        task="marks", size=cfg.generated_size, seed=cfg.seed + 1,
        counts={"train": cfg.source_per_class, "val": max(2, cfg.source_per_class // 7)}), progress=True)
    generate_dataset(target_data, SyntheticConfig(
        task="defects", size=cfg.generated_size, seed=cfg.seed + 2,
        counts={"train": cfg.target_per_class, "val": cfg.target_val_per_class, "test": cfg.target_test_per_class}),
        progress=True)

    base = TrainConfig(backbone=cfg.backbone, weights="none", mode="finetune", img_size=cfg.img_size, lr=2e-3,
                       batch_size=16, seed=cfg.seed, patience=max(cfg.source_epochs, cfg.target_epochs))
    log.info("[1/5] pretraining %s on the source task (%s)", cfg.backbone, source_data)
    source = train_or_reuse(source_data, out / "source", replace(base, epochs=cfg.source_epochs))
    target = replace(base, epochs=cfg.target_epochs)
    log.info("[2/5] adapting to the defect task: features mode (frozen backbone)")
    features = train_or_reuse(target_data, out / "transfer-features",
                               replace(target, weights=str(source.run), mode="features", lr=1e-2))
    log.info("[3/5] adapting to the defect task: finetune mode")
    finetune = train_or_reuse(target_data, out / "transfer-finetune", replace(target, weights=str(source.run)))
    log.info("[4/5] the same network from scratch on the same few labels")
    scratch = train_or_reuse(target_data, out / "scratch", target)

    adapted = max((features, finetune), key=lambda r: r.meta.metrics.get("val_accuracy", 0.0))
    log.info("[5/5] exporting %s, validating parity, then INT8 for %s", adapted.run.name, ", ".join(cfg.targets))
    onnx_path = export_onnx(adapted.run)
    report = validate(adapted.run)
    deployed = [deploy_target(adapted.run, t, calib=cfg.calibration) for t in cfg.targets]
    shipped = [_ship(adapted.run, cfg.ship, out / f"bundle-{cfg.ship}", target_data / "test", cfg.ship_images)
               for row in deployed if row["target"] == cfg.ship and row["passed"] is not None]
    train_images = cfg.target_per_class * 5
    models = [
        {"name": "transfer, features (frozen)", "pretraining": "source task", "run": str(features.run),
         "train_images": train_images, "test_accuracy": features.test_accuracy},
        {"name": "transfer, finetune", "pretraining": "source task", "run": str(finetune.run),
         "train_images": train_images, "test_accuracy": finetune.test_accuracy},
        {"name": "from scratch", "pretraining": "none", "run": str(scratch.run),
         "train_images": train_images, "test_accuracy": scratch.test_accuracy},
    ]
    seconds = time.perf_counter() - t0
    summary = {"config": asdict(cfg), "source_val_accuracy": source.meta.metrics.get("val_accuracy"),
               "models": models, "exported": str(adapted.run), "onnx": str(onnx_path),
               "parity_passed": report.passed, "targets": deployed, "bundle": shipped[0] if shipped else None,
               "seconds": round(seconds, 1)}
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", _summary_markdown(summary))
    return {**summary, "parity": report, "report": str(adapted.run / "parity.md")}


def _ship(run: Path, target: str, out: Path, images: Path, count: int) -> dict[str, Any]:
    """Bundle the target, verify the bundle and run the device runtime on one test image per class.

    The demo's INT8 gates may fail (see the README), so it bundles with `allow_failed`: the manifest
    records the failure and `verify` repeats it; a real deployment would stop at the failed gate.
    """
    from .bundle import verify_bundle, write_bundle
    from .runtime import open_bundle

    log.info("shipping %s: bundle → verify → infer on %d test images", target, count)
    result = write_bundle(run, target, out, archive=True, allow_failed=True, force=True)
    check = verify_bundle(result.archive or result.folder)
    chosen = [min(d.glob("*.png")) for d in sorted(images.iterdir()) if d.is_dir() and any(d.glob("*.png"))][:count]
    with open_bundle(result.archive or result.folder) as model:
        predictions = [{"image": p.relative_to(images).as_posix(), **model.predict(p).to_dict()} for p in chosen]
    return {"folder": str(result.folder), "archive": str(result.archive), "digest": result.digest,
            "parity_passed": result.manifest["parity"]["passed"], "verify_passed": check.passed,
            "golden_agreement": check.golden.agreement if check.golden else None, "predictions": predictions}


def _summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["# edgetransfer demo", "", "| model | pretraining | target train images | test accuracy |", "|---|---|---:|---:|"]
    lines += [f"| {m['name']} | {m['pretraining']} | {m['train_images']} | {m['test_accuracy']:.4f} |"
              for m in summary["models"]]
    lines += ["", "| target | precision | fp32 acc | deployed acc | agreement | latency b1 p50 | gates |",
              "|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {t['target']} | skipped: {t['skipped']} | | | | | |" if t["passed"] is None else
              f"| {t['target']} | {t['precision']} | {t['fp32_accuracy']:.4f} | {t['accuracy']:.4f} | "
              f"{t['agreement']:.4f} | {t['latency_ms']:.2f} ms | {'pass' if t['passed'] else 'FAIL'} |"
              for t in summary["targets"]]
    if (b := summary.get("bundle")) is not None:
        lines += ["", f"Bundle `{b['archive']}` (digest `{b['digest'][:16]}…`): parity at bundle time "
                      f"{'passed' if b['parity_passed'] else 'FAILED (recorded in the manifest)'}, verify "
                      f"{'passed' if b['verify_passed'] else 'FAILED'}", "",
                  "| image | class | score |", "|---|---|---:|"]
        lines += [f"| {p['image']} | {p['class']} | {p['score']:.3f} |" for p in b["predictions"]]
    lines += ["", f"Exported and validated: `{summary['onnx']}` — parity {'passed' if summary['parity_passed'] else 'FAILED'}",
              f"Wall time: {summary['seconds']} s"]
    return "\n".join(lines) + "\n"
