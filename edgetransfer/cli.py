"""The command line: parse flags, call one API function, print a summary, set the exit code.

No logic lives here beyond mapping flags onto the Python API and errors onto DESIGN.md's exit codes.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import EdgeTransferError

log = logging.getLogger("edgetransfer")


class _Group(click.Group):
    """Turns the toolkit's typed errors into one line on stderr and their exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeTransferError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.secho("interrupted: completed artifacts are kept; nothing half-written remains", err=True)
            ctx.exit(130)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (click's test runner swaps it per invocation)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("edgetransfer")
    root.handlers[:] = [handler]
    # under torchrun, global rank 0 speaks for the run; the other processes report only problems
    quiet = os.environ.get("RANK", "0") != "0"
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root.propagate = False  # third-party libraries configure the root logger; don't print twice
    # torch's extension loader warns about CUDA_HOME on CPU machines whenever NNCF imports it
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        numeric = rows and all(str(r[i])[:1] in "0123456789-—" for r in rows)
        table.add_column(col, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*[str(v) for v in row])
    Console(width=max(140, Console().width)).print(table)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="edgetransfer")
def main(verbose: bool) -> None:
    """Adapt a pretrained backbone to your images, export it, and prove the export answers the same."""
    _setup_logging(verbose)


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--backbone", default="resnet18", show_default=True, help="See `edgetransfer backbones`.")
@click.option("--weights", default="default", show_default=True,
              help="default | IMAGENET1K_V1 (any torchvision weights name) | none | PATH (state dict or run folder).")
@click.option("--mode", type=click.Choice(["features", "partial", "finetune"]), default="finetune", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--img-size", type=click.IntRange(min=8), default=224, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="Head learning rate.")
@click.option("--backbone-lr-mult", type=float, default=None, help="Backbone lr = lr x this (default 0.1 pretrained, 1 scratch).")
@click.option("--unfreeze-stages", type=click.IntRange(min=1), default=2, show_default=True, help="For --mode partial.")
@click.option("--patience", type=click.IntRange(min=1), default=5, show_default=True, help="Early stopping, in epochs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader workers per process (default: 0 on the CPU, min(8, cores per process - 1) on CUDA).")
@click.option("--compile", "compile_model", is_flag=True,
              help="torch.compile the training step (pays a warm-up; worth it for long runs on a GPU).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Train with N processes on this machine (one per GPU) through torchrun and "
                   "DistributedDataParallel. --batch-size stays the global batch.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder to create.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.pass_context
def train(ctx: click.Context, data: Path, out: Path, resume: bool, nproc: int | None, compile_model: bool,
          **options: Any) -> None:
    """Adapt a backbone to the ImageFolder tree DATA (DATA/train/<class>/..., optional val/ and test/).

    Several GPUs or machines: `--nproc N` here, or `torchrun ... -m edgetransfer train ...` (README).
    """
    from .adapt.distributed import env_rank
    from .adapt.train import TrainConfig, train as run_train

    options["num_workers"] = options.pop("workers")
    config = TrainConfig(**options, compile=compile_model)
    if nproc is not None:
        _launch_torchrun(ctx, data, out, config, resume, nproc)
    result = run_train(data, out, config, resume=resume)
    if env_rank() != 0:  # under torchrun, rank 0 prints the summary
        return
    m = result.meta.metrics
    _table(f"trained {result.meta.backbone} ({result.meta.mode}) → {out}", ["metric", "value"], [
        ["classes", ", ".join(result.meta.classes)], ["best epoch", m.get("best_epoch")],
        ["val accuracy", f"{m.get('val_accuracy', 0):.4f}"],
        ["test accuracy", "—" if m.get("test_accuracy") is None else f"{m['test_accuracy']:.4f}"],
        ["test images", m.get("test_samples")]])


def _launch_torchrun(ctx: click.Context, data: Path, out: Path, config: Any, resume: bool, nproc: int) -> None:
    """Replace this process by torchrun starting `nproc` copies of this very command without --nproc.

    The usage checks torchrun's workers would make run here first, so a bad --out or --device still
    exits 2 instead of surfacing as a failed worker (torchrun itself exits 1 when any worker fails).
    """
    from .adapt.distributed import pick_device, torchrun_command, under_torchrun
    from .adapt.train import check_run_folder
    from .errors import UsageError

    if under_torchrun():
        raise UsageError("--nproc starts torchrun; under torchrun already, leave it out", field="nproc")
    check_run_folder(data, out, config, resume=resume)
    if config.device != "cpu":
        pick_device(config.device, nproc - 1, nproc)  # one GPU per process, or exit 2 now
    args = []
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if param.name == "nproc" or value is None or value is False:
            continue
        if isinstance(param, click.Argument):
            args.append(str(value))
        else:
            args += [param.opts[0]] if value is True else [param.opts[0], str(value)]
    verbose = ["--verbose"] if ctx.find_root().params.get("verbose") else []
    command = torchrun_command(nproc, [*verbose, "train", *args])
    log.info("starting %d processes: %s", nproc, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--opset", type=click.IntRange(min=13), default=18, show_default=True)
def export(run: Path, opset: int) -> None:
    """Export RUN's best checkpoint to RUN/model.onnx (dynamic batch, metadata, full checker pass)."""
    from .export import export_onnx

    path = export_onnx(run, opset=opset)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opset {opset})")


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Held-out images: DIR/test/ or DIR/<class>/. Default: the run's own test split.")
@click.option("--target", default=None, help="Validate RUN/<target>/'s artifacts (see `edgetransfer targets`).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
def validate(run: Path, data: Path | None, target: str | None, batch_size: int) -> None:
    """Compare torch fp32 with the exported (and the target's quantized/compiled) models on held-out
    images; exit 1 when a gate fails."""
    from .stages import as_target, target_dir
    from .validate import validate as run_validate

    report = run_validate(run, data, target=target, batch_size=batch_size)
    _print_parity(report)
    # --target may be a YAML path: the report is in RUN/<the profile's name>/
    click.echo(f"report: {target_dir(run, as_target(target)) if target else run}/parity.md")
    if not report.passed:
        sys.exit(1)


def _print_parity(report: Any) -> None:
    rows = []
    for p in report.pairs:
        acc = "—" if p.candidate_accuracy is None else f"{p.reference_accuracy:.4f} / {p.candidate_accuracy:.4f}"
        rows.append([p.pair, p.samples, acc, f"{p.agreement:.4f}", f"{p.max_abs_diff:.2e}", f"{p.min_cosine:.6f}",
                     "pass" if p.passed else "FAIL: " + "; ".join(p.failures)])
    _table("parity", ["pair", "samples", "accuracy ref / cand", "agreement", "max |Δ|", "min cosine", "gate"], rows)


@main.group(invoke_without_command=True)
@click.pass_context
def targets(ctx: click.Context) -> None:
    """List the target profiles; `targets show NAME` prints one."""
    if ctx.invoked_subcommand is not None:
        return
    from .targets import list_targets, load_target

    rows = []
    for name in list_targets():
        t = load_target(name)
        q = t.quantization
        rows.append([name, t.backend, t.device, t.precision, f"{t.batch.min}-{t.batch.max}",
                     f"{q.quantizer}, {q.activations}, {q.weights}" if q else "—", t.description])
    _table("target profiles", ["name", "backend", "device", "precision", "batch", "quantization", "description"], rows)


@targets.command("show")
@click.argument("name")
def targets_show(name: str) -> None:
    """Print one target profile as YAML (defaults filled in)."""
    import yaml

    from .schema import to_dict
    from .targets import load_target

    click.echo(yaml.safe_dump(to_dict(load_target(name)), sort_keys=False).rstrip())


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--target", required=True, help="Target profile name or YAML path.")
@click.option("--calib", default=None, help="Calibration preset name or YAML path (default: the target's).")
def quantize(run: Path, target: str, calib: str | None) -> None:
    """Calibrate on train/val images and write RUN/<target>/model.int8.onnx (explicit QDQ)."""
    from .stages import quantize_run

    result = quantize_run(run, target, calib=calib)
    r = result.report
    rows = [[c["quantizer"], _fmt(c.get("val_accuracy")), _fmt(c.get("agreement")), c.get("error", "")]
            for c in r.candidates]
    _table(f"quantizers tried (fp32 validation accuracy {r.fp32_val_accuracy:.4f})",
           ["quantizer", "INT8 val accuracy", "agreement", "note"], rows)
    if r.fallback:
        _table(f"kept in fp32 to meet the {r.budget} point budget",
               ["layer", "op", "val accuracy after", "drop after (pts)", "saved (pts)"],
               [[f["layer"], f["op_type"], _fmt(f["val_accuracy_after"]), f"{f['drop_after']:.2f}",
                 f"{f['saved_points']:.2f}"] for f in r.fallback])
    click.echo(f"wrote {result.model} with {r.quantizer}: drop {r.drop:.2f} points "
               f"({'within' if r.within_budget else 'OVER'} the {r.budget} point budget); "
               f"calibration: {result.calibration['count']} images")
    if not r.within_budget:
        sys.exit(1)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


@main.command("compile")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--target", required=True, help="Target profile name or YAML path.")
def compile_cmd(run: Path, target: str) -> None:
    """Build the target's artifact in RUN/<target>/ (OpenVINO IR, ONNX Runtime model + session options...)."""
    from .stages import compile_run

    artifact = compile_run(run, target)
    click.echo(f"wrote {artifact}")


@main.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
def run_cmd(recipe: Path) -> None:
    """Run a recipe: train → export → quantize → compile → validate for each of its targets."""
    from .pipeline import run_recipe

    result = run_recipe(recipe)
    _print_targets(result["targets"])
    if not result["passed"]:
        sys.exit(1)


def _print_targets(rows: list[dict[str, Any]]) -> None:
    _table("per target: accuracy on held-out images, agreement with torch fp32, latency",
           ["target", "precision (ran)", "fp32 acc", "deployed acc", "drop (pts)", "agreement", "latency b1 p50",
            "gates"],
           [[r["target"], r["precision"], _fmt(r["fp32_accuracy"]), _fmt(r["accuracy"]), f"{r['drop']:.2f}",
             _fmt(r["agreement"]), f"{r['latency_ms']:.2f} ms", "pass" if r["passed"] else "FAIL"] for r in rows])


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--quick", is_flag=True, help="Smallest settings (a smoke test, not a meaningful comparison).")
def demo(out: Path, quick: bool) -> None:
    """The whole flow on the embedded synthetic factory-surface data, offline, on a CPU."""
    from .demo import run_demo

    result = run_demo(out, quick=quick)
    _table("transfer vs. training from scratch (same target data, same epochs)",
           ["model", "pretraining", "target train images", "test accuracy"],
           [[r["name"], r["pretraining"], r["train_images"], f"{r['test_accuracy']:.4f}"] for r in result["models"]])
    _print_parity(result["parity"])
    _print_targets([t for t in result["targets"] if t["passed"] is not None])
    click.echo(f"\nartifacts in {out}: {result['onnx']}, {result['report']}  ({result['seconds']:.0f} s)")
    if not result["parity"].passed or not all(t["passed"] for t in result["targets"] if t["passed"] is not None):
        sys.exit(1)


@main.command()
@click.option("--timm/--no-timm", default=True, help="Include timm models when timm is installed.")
def backbones(timm: bool) -> None:
    """List the backbone names `train --backbone` accepts."""
    from .backbones import list_backbones

    for name in list_backbones(include_timm=timm):
        click.echo(name)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--task", type=click.Choice(["defects", "marks"]), default="defects", show_default=True)
@click.option("--train", "n_train", type=click.IntRange(min=1), default=40, show_default=True, help="Images per class.")
@click.option("--val", "n_val", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--test", "n_test", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--size", type=click.IntRange(min=16), default=96, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def generate(out: Path, task: str, n_train: int, n_val: int, n_test: int, size: int, seed: int) -> None:
    """Write the synthetic factory-surface dataset (ImageFolder layout) to OUT."""
    from .data.synthetic import SyntheticConfig, generate_dataset

    counts = {k: v for k, v in (("train", n_train), ("val", n_val), ("test", n_test)) if v}
    info = generate_dataset(out, SyntheticConfig(task=task, counts=counts, size=size, seed=seed), progress=True)
    click.echo(f"wrote {out}: classes {', '.join(info['classes'])}; per class {counts}")


if __name__ == "__main__":
    main()
