#!/usr/bin/env bash
# The accelerator check, in one run: train-step throughput under pmap, FLOPs/MFU, matcher share, inference and
# device memory of the demo config and of the paper-scale config (lld_full: ResNet-50, 640 px, bfloat16), on
# random batches shaped like the pipeline's (accelerator images need not have TensorFlow).
#
#   OUT=runs/gpu_benchmark bash scripts/gpu_benchmark.sh
#
# Uses the machine's python3 and its JAX. Wheels of missing packages (ml_collections) may be put in .whl/.
# lld_full needs a torchvision ResNet-50 file for its frozen BatchNorm; with no ImageNet weights at hand, a
# randomly initialised torchvision ResNet-50 with zero-initialised residual branches stands in (finite
# activations; the step's cost is the same as with real weights). Writes OUT/gpu.txt and OUT/NAME.json for each
# of demo, lld_full, lld_full_b16 (per-device batch 16) and lld_sparse_pseudo (lld_sparse with pseudo-labels);
# BENCHES="..." picks and orders them, and each after the first runs only while SECONDS < BUDGET_S (default 420).
set -euo pipefail
OUT=${OUT:-runs/gpu_benchmark}
BUDGET_S=${BUDGET_S:-420}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
"$PY" -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

R50=/tmp/resnet50_random_zero_residual.safetensors
"$PY" - "$R50" <<'EOF'
import sys
import safetensors.torch
import torchvision
model = torchvision.models.resnet50(weights=None, zero_init_residual=True)
safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
EOF

bench() {  # name, then benchmark.py arguments
  local name=$1; shift
  echo "=== $name (${SECONDS} s)"
  "$PY" scripts/benchmark.py --synthetic_batches --skip_scaling --out="$OUT/$name.json" "$@" 2>&1 \
    | grep -v -E "^[IW][0-9]{4} " | tail -40
}
BENCHES=${BENCHES:-demo lld_full lld_full_b16 lld_sparse_pseudo}
first=1
for name in $BENCHES; do
  if (( ! first && SECONDS >= BUDGET_S )); then echo "skipped $name: ${SECONDS} s used of ${BUDGET_S}"; continue; fi
  first=0
  case $name in
    demo) bench demo --config=configs/synthetic_demo.py --steps=30 ;;
    lld_full) bench lld_full --config=configs/lld_full.py --steps=20 --config.model.pretrained="$R50" ;;
    lld_full_b16) bench lld_full_b16 --config=configs/lld_full.py --steps=10 --infer_repeats=5 \
                    --config.model.pretrained="$R50" --config.per_device_batch_size=16 ;;
    # The sparse paper-scale config with pseudo-labels: the EMA teacher's forward pass and the selection run in
    # every step (static shapes), so random batches time it although they yield no pseudo-label.
    lld_sparse_pseudo) bench lld_sparse_pseudo --config=configs/lld_sparse.py --steps=20 \
                         --config.model.pretrained="$R50" --config.pseudo_labels.enabled=True ;;
    *) echo "unknown benchmark $name (expected demo, lld_full, lld_full_b16, lld_sparse_pseudo)" >&2; exit 2 ;;
  esac
done
echo "done in ${SECONDS} s"
