"""Where INT8 error comes from and what each cure buys: scheme variants on one trained run.

    python benchmarks/int8_margin.py RUN [--variants NAME,...] [--layers N]

RUN is a trained and exported run folder (``runs/demo/transfer-finetune`` after ``make demo``). Each
variant quantizes RUN's fp32 ONNX with the default calibration preset (train/val images only, as
``quantize`` does, no fallback search) and is measured against the fp32 ONNX model in ONNX Runtime
on two image sets:

* ``seen``: every train + val image (what the quantization search may look at: agreement needs no
  labels), and
* ``test``: the held-out images (reported only; no choice is made on them).

Per set: top-1 agreement with fp32, the minimum and the 1st-percentile per-image logit cosine, and
the accuracy drop on test. Variants that target OpenVINO are also compiled and measured as OpenVINO
runs them (``ov``), with batch-1 p50 latency. ``--layers N`` prints the N layers whose INT8 error
alone is largest (leave-one-in: every other layer fp32), the per-layer analysis the search ranks by.

Prints the CPU (from /proc/cpuinfo) and the instruction-set caps in force: INT8 kernels round
differently on AMX, AVX-512 VNNI and AVX2, so a figure means nothing without them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("EDGETRANSFER_PROGRESS", "0")

import numpy as np  # noqa: E402

from edgetransfer.backends import get_backend  # noqa: E402
from edgetransfer.bench import measure  # noqa: E402
from edgetransfer.data.calibration import select_calibration  # noqa: E402
from edgetransfer.export import ONNX_FILE  # noqa: E402
from edgetransfer.parity import cosines  # noqa: E402
from edgetransfer.quantize.qdq import keep_fp32, quantized_layers  # noqa: E402
from edgetransfer.quantize.quantizers import QUANTIZERS  # noqa: E402
from edgetransfer.quantize.search import onnx_logits  # noqa: E402
from edgetransfer.spec import RunMeta  # noqa: E402
from edgetransfer.stages import load_arrays, run_splits  # noqa: E402
from edgetransfer.targets import load_calibration, load_target  # noqa: E402
from edgetransfer.validate import held_out_samples  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from intel_cpu_scheme import cpu_name  # noqa: E402


def variants() -> dict[str, tuple[str, dict]]:
    """name → (target profile, overrides of its quantization section)."""
    return {
        "ort-profile": ("x86-onnxruntime", {}),
        "ort-8bit": ("x86-onnxruntime", {"reduce_range": False}),
        "ort-sym-8bit": ("x86-onnxruntime", {"reduce_range": False, "activations": "symmetric"}),
        "ort-percentile-8bit": ("x86-onnxruntime", {"reduce_range": False, "calibration": "percentile"}),
        "nncf-profile": ("intel-cpu", {}),
        "nncf-8bit": ("intel-cpu", {"reduce_range": False}),
        "nncf-8bit-adds": ("intel-cpu", {"reduce_range": False, "float_ops": ()}),
        "ort-nncf": ("x86-onnxruntime", {"quantizer": "nncf", "activations": "symmetric", "float_ops": ("Add",)}),
        "ort-nncf-asym": ("x86-onnxruntime", {"quantizer": "nncf"}),
        "ort-sym": ("x86-onnxruntime", {"activations": "symmetric"}),
    }


def parse(name: str, table: dict[str, tuple[str, dict]]) -> tuple[str, dict]:
    """`VARIANT` or `VARIANT+fp32:NODE;NODE`: a variant with those nodes kept in fp32."""
    base, _, keep = name.partition("+fp32:")
    target, overrides = table[base]
    return target, {**overrides, "exclude": [n for n in keep.split(";") if n]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--variants", default=None,
                        help="comma-separated names (default: all); NAME+fp32:NODE;NODE keeps those nodes fp32")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--no-ov", action="store_true", help="skip the OpenVINO compile and latency")
    args = parser.parse_args()

    meta = RunMeta.load(args.run / "meta.json")
    splits = run_splits(meta)
    seen = np.concatenate(load_arrays([*splits.train, *splits.val], meta.input_spec))
    samples, _ = held_out_samples(meta, None)
    test = np.concatenate(load_arrays(samples, meta.input_spec))
    labels = np.array([s.label for s in samples])
    fp32 = args.run / ONNX_FILE
    ref_seen, ref_test = onnx_logits(fp32, seen), onnx_logits(fp32, test)
    print(f"{args.run}: {len(seen)} train+val images, {len(test)} test images; {cpu_name()}; caps: "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')} "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')}")
    print("| variant | runs in | seen agreement | seen min cos | seen p1 cos | test agreement | test min cos | "
          "test p1 cos | test drop (pts) | b1 p50 ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    chosen = variants()
    names = args.variants.split(",") if args.variants else list(chosen)
    with tempfile.TemporaryDirectory(prefix="edgetransfer-margin-") as tmp:
        for name in names:
            target_name, overrides = parse(name, chosen)
            target = load_target(target_name)
            scheme = dataclasses.replace(target.quantization, **{k: v for k, v in overrides.items()
                                                                  if k not in ("calibration", "exclude")})
            preset = load_calibration(overrides.get("calibration", scheme.calibration))
            calibration = load_arrays(select_calibration(splits, preset).samples, meta.input_spec)
            qdq = Path(tmp) / f"{name}.onnx"
            with QUANTIZERS[scheme.quantizer]() as quantizer:
                quantizer.quantize(fp32, qdq, scheme=scheme, preset=preset, calibration=calibration,
                                   exclude=overrides["exclude"])
            runs = {"ort": lambda x: onnx_logits(qdq, x)}
            runner = None
            if target.backend == "openvino" and not args.no_ov:
                backend = get_backend("openvino")
                runner = backend.load(backend.compile(qdq, target, Path(tmp) / f"{name}-ir"), target)
                runner.__enter__()
                runs["ov"] = lambda x, r=runner: np.concatenate([r.infer(x[i:i + 8]) for i in range(0, len(x), 8)])
            for where, fn in runs.items():
                s, t = fn(seen), fn(test)
                cs, ct = cosines(ref_seen, s), cosines(ref_test, t)
                drop = 100.0 * (float((ref_test.argmax(1) == labels).mean()) - float((t.argmax(1) == labels).mean()))
                timed = runner if where == "ov" else get_backend("onnxruntime").load(qdq)
                with contextlib.nullcontext() if where == "ov" else timed:
                    p50 = f"{measure(timed, tuple(test.shape[1:]), batch=1, warmup=5, iterations=100).p50_ms:.2f}"
                print(f"| {name} | {where} | {(s.argmax(1) == ref_seen.argmax(1)).mean():.4f} | {cs.min():.4f} | "
                      f"{np.percentile(cs, 1):.4f} | {(t.argmax(1) == ref_test.argmax(1)).mean():.4f} | {ct.min():.4f} | "
                      f"{np.percentile(ct, 1):.4f} | {drop:.2f} | {p50} |", flush=True)
            if runner is not None:
                runner.__exit__(None, None, None)
            if args.layers:
                layer_errors(fp32, qdq, scheme, preset, calibration, seen, ref_seen, args.layers, Path(tmp) / f"{name}-fw.onnx")
    return 0


def layer_errors(fp32: Path, qdq: Path, scheme, preset, calibration, x: np.ndarray, ref: np.ndarray, top: int,
                 fake_path: Path) -> None:
    """Leave-one-in: each layer alone in INT8 (every other layer fp32), its logit MSE and min cosine."""
    import onnx

    pick = np.unique(np.linspace(0, len(x) - 1, min(300, len(x))).astype(int))
    x, ref = x[pick], ref[pick]
    with QUANTIZERS[scheme.quantizer]() as quantizer:
        quantizer.quantize(fp32, fake_path, scheme=scheme, preset=preset, calibration=calibration, float_weights=True)
    fake, reference = onnx.load(str(fake_path)), onnx.load(str(fp32))
    layers = quantized_layers(fake)
    names = [n for n, _ in layers]

    def run(keep: list[str]) -> np.ndarray:
        edited = copy.deepcopy(fake)
        keep_fp32(edited, keep, reference)
        return onnx_logits(edited, x)

    full, floor = run([]), run(names)
    mse = lambda a: float(np.mean((a.astype(np.float64) - ref) ** 2))  # noqa: E731
    print(f"  all layers INT8: mse {mse(full):.4g}, min cos {cosines(ref, full).min():.4f}; no layer INT8 "
          f"(quantizers outside layers only): mse {mse(floor):.4g}, min cos {cosines(ref, floor).min():.4f}")
    rows = []
    for name, op in layers:
        alone = run([n for n in names if n != name])
        rows.append((mse(alone) - mse(floor), cosines(ref, alone).min(), name, op))
    rows.sort(key=lambda r: -r[0])
    for added, cos, name, op in rows[:top]:
        print(f"  {name} ({op}): added mse {added:.4g}, min cos {cos:.4f}")


if __name__ == "__main__":
    sys.exit(main())
