#!/usr/bin/env bash
# The GPU checks of issue 7, as one script for a machine with an NVIDIA GPU:
#   1. CUDA training smoke runs (finetune with AMP + channels_last, the same with --compile, features mode),
#   2. the training-throughput benchmark for resnet50 and mobilenet_v3_large at 224x224.
# Run from the repository root:  OUT=/some/folder PYTHONPATH=. bash benchmarks/gpu_check.sh
# Everything lands in $OUT: env.txt, smoke-*.log, throughput.md/.json/.log, summary.txt (one line per step
# with its exit code). Each step has its own timeout so one hang cannot eat the whole allotment.
# The NCCL path of DistributedDataParallel needs 2+ GPUs (NCCL refuses two processes on one GPU);
# with 2+ GPUs visible, step 1 also trains with `torchrun --nproc-per-node 2`.
set -u
OUT=${OUT:?set OUT to a folder for the results}
PY=${PYTHON:-python3}
export EDGETRANSFER_PROGRESS=0 PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$OUT"
: > "$OUT/summary.txt"

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi; echo; $PY - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
      "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
for mod in ("torchvision", "safetensors", "click", "rich", "PIL", "numpy", "onnx", "timm"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"))
    except ImportError as exc:
        print(mod, "MISSING", exc)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. smoke runs through the Python API (the CLI calls exactly this; the API needs no click/rich)
step smoke-train 240 $PY - "$OUT" <<'EOF'
import json, logging, sys
from pathlib import Path
from edgetransfer.adapt.train import TrainConfig, train
from edgetransfer.data.synthetic import SyntheticConfig, generate_dataset
logging.basicConfig(level=logging.INFO, format="%(message)s")
out = Path(sys.argv[1]) / "smoke"
data = out / "data"
generate_dataset(data, SyntheticConfig(task="defects", counts={"train": 16, "val": 4, "test": 4}, size=80, seed=0))
base = dict(backbone="resnet18", weights="none", epochs=3, img_size=64, batch_size=16, device="cuda")
results = {}
for name, extra in (("finetune", {}), ("finetune-compile", {"compile": True}), ("features", {"mode": "features"})):
    r = train(data, out / name, TrainConfig(**base, **extra))
    results[name] = {"test_accuracy": r.test_accuracy, "epoch_seconds": [h["seconds"] for h in r.history]}
    print(name, results[name], flush=True)
(out / "smoke.json").write_text(json.dumps(results, indent=2))
EOF

NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -ge 2 ]; then
  step smoke-ddp-nccl 240 $PY -m torch.distributed.run --standalone --nproc-per-node=2 -m edgetransfer train \
    "$OUT/smoke/data" --out "$OUT/smoke/ddp" --backbone resnet18 --weights none --epochs 3 --img-size 64 --batch-size 16
else
  echo "smoke-ddp-nccl: skipped ($NGPU GPU visible; NCCL needs one GPU per process)" | tee -a "$OUT/summary.txt"
fi

# 2. throughput: edgetransfer's step vs a hand-written loop, features mode vs frozen backbone every epoch
step throughput 420 $PY benchmarks/train_throughput.py --device cuda --models resnet50 mobilenet_v3_large \
  --size 224 --batch 64 --steps 30 --repeats 3 --features-images 512 --out "$OUT/throughput.json"
grep -E '^\||^$|load average' "$OUT/throughput.log" > "$OUT/throughput.md" || true
cat "$OUT/throughput.md"
