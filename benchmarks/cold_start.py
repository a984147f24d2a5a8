"""Cold start of the device runtime: a fresh process opens a bundle and makes its first prediction.

    python benchmarks/cold_start.py [--target intel-cpu] [--size 224] [--runs 5] [--python PY] [--work DIR]
    python benchmarks/cold_start.py --bundle DIR/bundle-intel-cpu --image IMG --python .venv-runtime/bin/python

Builds a resnet18 bundle at 224x224 through the real stages (synthetic images, one epoch from random
weights — cold start depends on neither the weights nor the accuracy), then starts `--runs` fresh
Python processes (`--python`: e.g. a runtime-only venv without torch) that each time:

- `import`:  importing edgetransfer.runtime,
- `open`:    open_bundle (manifest check, sha256 of the model files, backend import, model load/compile),
- `first`:   the first predict() on a 224x224 PNG (decode, preprocess, first inference),

and reports the median of each; "cold start" is open + first (the goal: under one second for resnet18
on a CPU), "process" is the whole child process as the parent saw it, interpreter start included.
The file cache is warm after the first run, as on a device that has booted before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from edgetransfer.runtime import open_bundle
t1 = time.perf_counter()
model = open_bundle(sys.argv[1])
t2 = time.perf_counter()
p = model.predict(sys.argv[2])
t3 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "open_ms": (t2 - t1) * 1e3, "first_ms": (t3 - t2) * 1e3,
                  "cold_start_ms": (t3 - t1) * 1e3, "precision": model.precision, "class": p.label,
                  "torch_imported": "torch" in sys.modules}))
"""


def build_bundle(work: Path, target: str, size: int) -> tuple[Path, Path]:
    """A resnet18 bundle for `target` at `size` px, and one test image; made through the real stages."""
    from edgetransfer.adapt.train import TrainConfig, train
    from edgetransfer.bundle import write_bundle
    from edgetransfer.data.synthetic import SyntheticConfig, generate_dataset
    from edgetransfer.export import export_onnx
    from edgetransfer.stages import compile_run, quantize_run
    from edgetransfer.targets import load_target
    from edgetransfer.validate import validate

    data, run = work / "data", work / "run"
    generate_dataset(data, SyntheticConfig(task="defects", counts={"train": 2, "val": 2, "test": 1},
                                           size=round(size / 0.875), seed=0))
    train(data, run, TrainConfig(backbone="resnet18", weights="none", epochs=1, img_size=size, batch_size=8))
    export_onnx(run)
    if load_target(target).quantized:
        quantize_run(run, target, calib="quick")
    compile_run(run, target)
    validate(run, target=target)
    bundle = write_bundle(run, target, work / f"bundle-{target}", golden=8, allow_failed=True)
    return bundle.folder, sorted((data / "test").rglob("*.png"))[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="intel-cpu")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--python", default=sys.executable, help="interpreter of the child processes")
    ap.add_argument("--bundle", type=Path, default=None, help="time this bundle instead of building one")
    ap.add_argument("--image", type=Path, default=None, help="with --bundle: the image to predict on")
    ap.add_argument("--work", type=Path, default=None, help="build the bundle here and keep it (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        if args.bundle is None:
            print(f"building a resnet18 {args.size}x{args.size} bundle for {args.target} ...", file=sys.stderr)
            bundle, image = build_bundle(args.work or Path(tmp), args.target, args.size)
        else:
            bundle, image = args.bundle, args.image
        runs = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = subprocess.run([args.python, "-c", CHILD, str(bundle), str(image)], capture_output=True, text=True,
                                 env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "EDGETRANSFER_PROGRESS": "0"})
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            runs.append({**json.loads(out.stdout), "process_ms": (time.perf_counter() - t0) * 1e3})
    median = {k: statistics.median(r[k] for r in runs) for k in ("import_ms", "open_ms", "first_ms",
                                                                  "cold_start_ms", "process_ms")}
    result = {"target": args.target, "size": args.size, "python": args.python, "runs": runs, "median": median,
              "precision": runs[0]["precision"], "torch_imported": any(r["torch_imported"] for r in runs)}
    print(f"resnet18 {args.size}x{args.size}, {args.target} ({result['precision']}), {args.runs} fresh processes "
          f"({args.python}), median:")
    print("| import edgetransfer.runtime | open_bundle | first predict | cold start (open + first) | whole process |")
    print("|---:|---:|---:|---:|---:|")
    print("| " + " | ".join(f"{median[k]:.0f} ms" for k in ("import_ms", "open_ms", "first_ms", "cold_start_ms",
                                                            "process_ms")) + " |")
    print(f"torch imported in the child: {result['torch_imported']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
