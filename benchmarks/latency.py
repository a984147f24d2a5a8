"""Batch-1 and batch-8 latency of torch eager fp32 vs every artifact edgetransfer builds, in one run.

    python benchmarks/latency.py [--models resnet18 mobilenet_v3_large] [--size 224] [--out FILE.json]

Weights are random and calibration uses random images: latency does not depend on either (accuracy
is what `edgetransfer validate` measures on real images). Every artifact is produced through the
same code paths as `edgetransfer quantize/compile`, so the numbers describe what users ship.
Ratios are "times faster than torch eager fp32 at the same batch size".
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgetransfer.backends import get_backend
from edgetransfer.backends.base import Runner
from edgetransfer.backbones import create
from edgetransfer.bench import measure
from edgetransfer.export import export_module
from edgetransfer.quantize import QUANTIZERS
from edgetransfer.targets import Target, load_calibration, load_target


class TorchEager(Runner):
    description = "torch eager"

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(batch)).numpy()


def artifacts(name: str, size: int, work: Path) -> list[tuple[str, Runner]]:
    """(label, runner) for every artifact we can build here for this model."""
    bb = create(name, 5, weights="none", img_size=size)
    model = bb.model.eval()
    fp32 = export_module(model, bb.input_spec, work / f"{name}.onnx")
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((8, 3, size, size)).astype(np.float32) for _ in range(4)]
    preset = load_calibration("quick")
    ort, ov = get_backend("onnxruntime"), get_backend("openvino", require=False)
    out: list[tuple[str, Runner]] = [("torch eager fp32", TorchEager(model)), ("onnxruntime fp32", ort.load(fp32))]
    x86 = load_target("x86-onnxruntime")
    q_ort = work / f"{name}.x86.int8.onnx"
    QUANTIZERS["onnxruntime"]().quantize(fp32, q_ort, scheme=x86.quantization, preset=preset, calibration=calib)
    out.append(("onnxruntime int8 (x86-onnxruntime)", ort.load(q_ort, x86)))
    if ov.available() is None:
        cpu = load_target("intel-cpu")
        fp32_target = Target(name="cpu-fp32", description="OpenVINO CPU fp32", backend="openvino", device="CPU",
                             precision="fp32")
        out.append(("openvino fp32", ov.load(ov.compile(fp32, fp32_target, work / f"{name}-ov-fp32"), fp32_target)))
        fp16 = load_target("intel-cpu-fp16")
        out.append(("openvino intel-cpu-fp16", ov.load(ov.compile(fp32, fp16, work / f"{name}-ov-fp16"), fp16)))
        for quantizer in ("onnxruntime", "nncf"):
            q = work / f"{name}.intel-cpu.{quantizer}.int8.onnx"
            if QUANTIZERS[quantizer]().available() is not None:
                continue
            QUANTIZERS[quantizer]().quantize(fp32, q, scheme=cpu.quantization, preset=preset, calibration=calib)
            xml = ov.compile(q, cpu, work / f"{name}-ov-int8-{quantizer}")
            out.append((f"openvino intel-cpu int8 ({quantizer} QDQ)", ov.load(xml, cpu)))
        if QUANTIZERS["nncf"]().available() is None:
            out.append(("openvino int8, hand-rolled (nncf.quantize defaults)",
                        ov.load(ov.compile(nncf_defaults(fp32, calib, work / f"{name}.nncf-defaults.onnx"), cpu,
                                           work / f"{name}-ov-nncf-defaults"), cpu)))
    return out


def nncf_defaults(fp32: Path, calib: list[np.ndarray], out: Path) -> Path:
    """What a user writes by hand: `nncf.quantize(model, dataset)` with every option at its default
    (8-bit weights but the first layer, residual Adds quantized, NNCF's own bias correction)."""
    import nncf
    import onnx

    from edgetransfer.quantize.quantizers import input_name
    from edgetransfer.telemetry import telemetry_off

    model = onnx.load(str(fp32))
    name = input_name(model)
    with telemetry_off():
        quantized = nncf.quantize(model, nncf.Dataset(calib, lambda b: {name: b}))
    onnx.save_model(quantized, str(out))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_large"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--min-seconds", type=float, default=2.0, help="per measurement, after warm-up")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for label, runner in artifacts(name, args.size, Path(tmp)):
                with runner:
                    for b in args.batches:
                        lat = measure(runner, (3, args.size, args.size), batch=b, warmup=5, iterations=10,
                                      min_seconds=args.min_seconds)
                        results.append({"model": name, "artifact": label, "precision": runner.precision,
                                        **lat.to_dict()})
                        print(f"{name:20s} {label:42s} b{b}: {lat.p50_ms:8.2f} ms p50", file=sys.stderr)
    base = {(r["model"], r["batch"]): r["p50_ms"] for r in results if r["artifact"] == "torch eager fp32"}
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.size}x{args.size}\n")
    print("| model | artifact | ran as | batch | p50 ms | p90 ms | images/s | × torch eager |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = base[(r["model"], r["batch"])] / r["p50_ms"]
        print(f"| {r['model']} | {r['artifact']} | {r['precision']} | {r['batch']} | {r['p50_ms']:.2f} | "
              f"{r['p90_ms']:.2f} | {r['images_per_s']:.1f} | {ratio:.2f}× |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
