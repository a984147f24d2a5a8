"""Does `select`'s predicted accuracy rank backbone × input size the way fine-tuning does?

    python benchmarks/select_tau.py [--work runs/select-tau] [--data DIR] [--target intel-cpu]
                                    [--candidates efficientnet_lite0,efficientnet_lite1,efficientnet_lite2]
                                    [--sizes 96,128,160] [--seeds 0] [--out FILE.json]

1. The demo's defect data (generated exactly as `edgetransfer demo` does, into WORK/data/defects,
   unless --data names a folder).
2. `select` over every candidate × size, timed (wall clock): predicted accuracy (linear probe, CV on
   train + val), LogME, latency on the target.
3. Every candidate × size fine-tuned with the demo's recipe (`DemoConfig`: finetune mode, 8 epochs,
   lr 1e-3, backbone lr × 0.1, batch 32, seed 0) at that input size, into WORK/finetune/<backbone>-<size>
   (a finished run with the same settings is reused), and its accuracy on the held-out test
   split, which `select` never reads. With `--seeds 0,1,2` each pair is fine-tuned once per seed
   (WORK/finetune/<backbone>-<size>-seed<N> for seeds other than 0) and its actual accuracy is
   the mean: one seed's accuracy moves by a few test images, as much as backbones differ.
4. Kendall's tau-b between predicted and actual test accuracy (and between actual and LogME, and the
   probe on the head's input alone, which `select` ranked by before 2026-12-03); with several seeds,
   also between the seeds' own rankings: how well one fine-tuning reproduces another's order, the
   most a predictor can expect.

Prints a table and writes WORK/select_tau.json (or --out). Almost all of its time is fine-tuning:
22 minutes for the nine default pairs × seeds 1 and 2 on the idle 2-core Xeon VM (README, "Choosing
a backbone", has the result).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from edgetransfer.bench import _machine
from edgetransfer.data.synthetic import generate_dataset
from edgetransfer.demo import DemoConfig
from edgetransfer.fsutil import write_json
from edgetransfer.pipeline import train_or_reuse
from edgetransfer.select import kendall_tau_b, select


def demo_data(work: Path) -> Path:
    """The demo's dataset (same generator, seed, size and counts as `run_demo`)."""
    data = work / "data" / "defects"
    generate_dataset(data, DemoConfig().data)
    return data


def seed_agreement(rows: list[dict]) -> float | None:
    """Mean Kendall tau-b between the rankings two seeds' fine-tuning give (None: one seed)."""
    per_seed = list(zip(*(r["test_accuracy_per_seed"] for r in rows)))
    taus = [kendall_tau_b(a, b) for i, a in enumerate(per_seed) for b in per_seed[i + 1:]]
    return float(sum(taus) / len(taus)) if taus and len(rows) > 1 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/select-tau"))
    ap.add_argument("--data", type=Path, default=None, help="default: generate the demo's data into WORK/data")
    ap.add_argument("--target", default="intel-cpu")
    ap.add_argument("--candidates", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    ap.add_argument("--sizes", default="96,128,160")
    ap.add_argument("--seeds", default="0", help="fine-tune each pair once per seed; actual accuracy = the mean")
    ap.add_argument("--out", type=Path, default=None, help="default: WORK/select_tau.json")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data = args.data or demo_data(args.work)
    candidates = args.candidates.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]

    t0 = time.perf_counter()
    result = select(data, target=args.target, candidates=candidates, sizes=sizes, out=args.work / "select")
    select_seconds = time.perf_counter() - t0
    print(f"select: {len(result.candidates)} candidates in {select_seconds:.0f} s; "
          f"recommended {result.recommendation.message}", flush=True)

    rows = []
    for c in result.candidates:
        t1 = time.perf_counter()
        runs = []
        for seed in seeds:
            name = f"{c.backbone}-{c.size}" + (f"-seed{seed}" if seed else "")
            config = DemoConfig().finetune_recipe(c.backbone, c.size, seed)
            runs.append(train_or_reuse(data, args.work / "finetune" / name, config))
            print(f"fine-tuned {c.label} seed {seed}: test accuracy {runs[-1].test_accuracy:.4f}", flush=True)
        per_seed = [r.test_accuracy for r in runs]
        m = runs[0].meta.metrics
        rows.append({"backbone": c.backbone, "size": c.size, "predicted_accuracy": c.predicted_accuracy,
                     "standard_error": c.standard_error, "head_probe_accuracy": c.head_probe_accuracy,
                     "logme": c.logme, "latency_ms": c.latency_ms,
                     "test_accuracy": float(sum(per_seed) / len(per_seed)), "test_accuracy_per_seed": per_seed,
                     "seeds": seeds, "val_accuracy": m.get("val_accuracy"), "test_images": m.get("test_samples"),
                     "finetune_runs": [str(r.run) for r in runs],
                     "finetune_seconds_this_call": round(time.perf_counter() - t1, 1)})

    actual = [r["test_accuracy"] for r in rows]
    tau = kendall_tau_b([r["predicted_accuracy"] for r in rows], actual) if len(rows) > 1 else float("nan")
    tau_logme = kendall_tau_b([r["logme"] for r in rows], actual) if len(rows) > 1 else float("nan")
    tau_head = kendall_tau_b([r["head_probe_accuracy"] for r in rows], actual) if len(rows) > 1 else float("nan")
    print()
    print("| backbone | input | predicted accuracy (linear probe, CV) | head's input alone | LogME | "
          "latency b1 p50 (ms) | "
          f"fine-tuned test accuracy (mean of seeds {args.seeds}) | per seed |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in sorted(rows, key=lambda r: -r["test_accuracy"]):
        lat = "—" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}"
        print(f"| {r['backbone']} | {r['size']} | {r['predicted_accuracy']:.3f} ± {r['standard_error']:.3f} | "
              f"{r['head_probe_accuracy']:.3f} | "
              f"{r['logme']:.4f} | {lat} | {r['test_accuracy']:.4f} | "
              f"{', '.join(f'{a:.4f}' for a in r['test_accuracy_per_seed'])} |")
    print(f"\nKendall tau-b, predicted accuracy vs fine-tuned test accuracy: {tau:.3f} over {len(rows)} pairs")
    print(f"Kendall tau-b, LogME vs fine-tuned test accuracy: {tau_logme:.3f}")
    print(f"Kendall tau-b, the probe on the head's input alone (select before 2026-12-03) vs fine-tuned test "
          f"accuracy: {tau_head:.3f}")
    between = seed_agreement(rows)
    if between is not None:
        print(f"Kendall tau-b between the seeds' own rankings (mean over seed pairs): {between:.3f}: how far one "
              f"fine-tuning's ranking reproduces another's, the most a predictor can expect against one seed")
    print(f"select wall time: {select_seconds:.0f} s")
    out = args.out or args.work / "select_tau.json"
    write_json(out, {"tau_b_predicted_accuracy": tau if len(rows) > 1 else None,
                     "tau_b_logme": tau_logme if len(rows) > 1 else None, "tau_b_between_seeds": between,
                     "tau_b_head_probe": tau_head if len(rows) > 1 else None, "pairs": len(rows), "seeds": seeds,
                     "select_seconds": round(select_seconds, 1), "target": args.target, "data": str(data),
                     "recipe": {k: v for k, v in asdict(DemoConfig().finetune_recipe()).items()
                                if k not in ("backbone", "img_size")},
                     "recommendation": result.recommendation.message, "rows": rows, "machine": _machine()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
