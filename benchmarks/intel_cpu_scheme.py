"""Does OpenVINO compute the QDQ file it was given? The intel-cpu quantization scheme, step by step.

    python benchmarks/intel_cpu_scheme.py RUN [--target intel-cpu]

RUN is a trained and exported run folder (``runs/demo/transfer-finetune`` after ``make demo``). Each
scheme quantizes RUN's fp32 ONNX with the target's calibration preset (train/val images only, as
``quantize`` does, no fallback), then on RUN's test images measures the minimum per-image logit
cosine and the top-1 agreement between:

* OpenVINO (compiled the way ``edgetransfer compile`` compiles) and ONNX Runtime on the same file:
  what ``validate``'s compiler-fidelity pair gates (min cosine >= 0.99 for intel-cpu);
* ONNX Runtime with its default graph optimizations (fused integer kernels) and with none (every
  DequantizeLinear, float op and QuantizeLinear run as written: the file's exact function);

and OpenVINO's batch-1 latency (p50 of 100 runs, three rounds). Rows:

1. ``onnxruntime asymmetric``: ONNX Runtime's quantizer, u8 asymmetric activations (intel-cpu's old scheme);
2. ``nncf, float biases``: NNCF symmetric with the biases as NNCF writes them (edgetransfer's rounding of
   float biases onto the accumulator grid is switched off for this row only, to measure what it buys);
3. ``nncf, Adds quantized``: NNCF symmetric, biases on the grid, residual Adds with int8 inputs;
4. ``profile``: the target's own scheme (for intel-cpu: the above with ``float_ops: [Add]``).

The README's table under "Which quantizer each target uses" is this script's output on the demo run.
Runs in about a minute on 2 CPU cores. Set ``ONEDNN_MAX_CPU_ISA=AVX2`` (or ``AVX512_CORE_VNNI``) to
see whether OpenVINO's figures depend on the instruction set.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("EDGETRANSFER_PROGRESS", "0")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import edgetransfer.quantize.quantizers as quantizers  # noqa: E402
from edgetransfer.backends import get_backend  # noqa: E402
from edgetransfer.bench import measure  # noqa: E402
from edgetransfer.data.calibration import select_calibration  # noqa: E402
from edgetransfer.export import ONNX_FILE  # noqa: E402
from edgetransfer.spec import RunMeta  # noqa: E402
from edgetransfer.stages import load_arrays, run_splits  # noqa: E402
from edgetransfer.targets import load_calibration, load_target  # noqa: E402
from edgetransfer.validate import held_out_samples  # noqa: E402


@contextmanager
def float_biases_as_written():
    """Row 2 only: leave the quantizer's float biases where it put them."""
    snap = quantizers.snap_biases  # what Quantizer.quantize calls after every tool
    quantizers.snap_biases = lambda model: None
    try:
        yield
    finally:
        quantizers.snap_biases = snap


def ort_logits(path: Path, x: np.ndarray, *, optimized: bool) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(((a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)).min())


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    return f"{model} ({', '.join(isa)}), {os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--target", default="intel-cpu")
    args = parser.parse_args()

    meta = RunMeta.load(args.run / "meta.json")
    target = load_target(args.target)
    preset = load_calibration(target.quantization.calibration)
    calibration = load_arrays(select_calibration(run_splits(meta), preset).samples, meta.input_spec)
    samples, source = held_out_samples(meta, None)
    x = np.concatenate(load_arrays(samples, meta.input_spec))
    backend = get_backend(target.backend)
    profile = target.quantization
    rows = [("onnxruntime asymmetric", dataclasses.replace(profile, quantizer="onnxruntime",
                                                           activations="asymmetric", float_ops=()), False),
            ("nncf, float biases", dataclasses.replace(profile, quantizer="nncf", activations="symmetric",
                                                       float_ops=()), True),
            ("nncf, Adds quantized", dataclasses.replace(profile, quantizer="nncf", activations="symmetric",
                                                         float_ops=()), False),
            (f"profile {target.name}", profile, False)]
    print(f"{args.run} on {len(x)} test images ({source}); {cpu_name()}; "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}")
    print("| scheme | OpenVINO vs ONNX Runtime: min cosine | agreement | ONNX Runtime fused vs op by op: min cosine "
          "| OpenVINO b1 p50 (ms, 3 rounds) |")
    print("|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="edgetransfer-scheme-") as tmp:
        for i, (name, scheme, as_written) in enumerate(rows):
            qdq = Path(tmp) / f"{i}.onnx"
            with quantizers.QUANTIZERS[scheme.quantizer]() as quantizer:
                if as_written:
                    with float_biases_as_written():
                        quantizer.quantize(args.run / ONNX_FILE, qdq, scheme=scheme, preset=preset,
                                           calibration=calibration)
                else:
                    quantizer.quantize(args.run / ONNX_FILE, qdq, scheme=scheme, preset=preset,
                                       calibration=calibration)
            fused, exact = ort_logits(qdq, x, optimized=True), ort_logits(qdq, x, optimized=False)
            with backend.load(backend.compile(qdq, target, Path(tmp) / f"ir{i}"), target) as runner:
                compiled = np.concatenate([runner.infer(x[j:j + target.batch.max])
                                           for j in range(0, len(x), target.batch.max)])
                p50 = [measure(runner, tuple(x.shape[1:]), batch=1, warmup=5, iterations=100).p50_ms
                       for _ in range(3)]
            agreement = float((fused.argmax(1) == compiled.argmax(1)).mean())
            print(f"| {name} | {min_cosine(fused, compiled):.4f} | {agreement:.4f} | {min_cosine(fused, exact):.4f} "
                  f"| {' / '.join(f'{v:.2f}' for v in p50)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
