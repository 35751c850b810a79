#!/usr/bin/env bash
# The one-command demo on a fresh machine: set up, generate a synthetic LLD download, build it with TFDS,
# train configs/synthetic_demo.py and evaluate it on the test split, predict on a few test images, write a report.
# Everything lands in demo_run/ (override with DEMO_DIR=...). Extra arguments go to the trainer as
# config overrides, e.g. `bash scripts/demo.sh --config.total_steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-demo_run}
start=$(date +%s)
bash scripts/setup_env.sh
PY=.venv/bin/python
mkdir -p "$DEMO_DIR"
if [ ! -d "$DEMO_DIR/download" ]; then
  # LLD's 48 patients, 36 of them for training with 15 fields each; 5 fields of each test patient are enough to
  # score (the test split's size sets the evaluation's time). Fields drawn on every core: each is seeded on its own,
  # so the files do not depend on the worker count.
  $PY -m tfds_lld.synthetic --out "$DEMO_DIR/download" --layout coco --subsets H_100x_C1,L_100x_C2 \
      --patients 48 --images-per-patient 15 --test-images-per-patient 5 --seed 0 \
      --workers "$(getconf _NPROCESSORS_ONLN)"
fi
# XLA's CPU backend at optimization level 1: most of the default level's speed for half its compile time.
# Compiled programs are cached, so a second run (and prediction after training) compiles less.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=1"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$DEMO_DIR/jit_cache}
# Training ends with the evaluation of the test split: metrics.json and plots in $DEMO_DIR/train/eval/test.
$PY -m lld_jax.train --config=configs/synthetic_demo.py --workdir="$DEMO_DIR/train" \
    --config.dataset.manual_dir="$DEMO_DIR/download" --config.dataset.data_dir="$DEMO_DIR/tfds" "$@"
# A glob, not `ls | head`: under pipefail, head closing the pipe early can kill ls with SIGPIPE and the demo with it.
test_images=("$DEMO_DIR"/download/*/Images/test/*.png)
mkdir -p "$DEMO_DIR/predict_inputs"
cp "${test_images[@]:0:4}" "$DEMO_DIR/predict_inputs/"
# Batches of 4, as in training's evaluation: the compiled program comes from the cache.
$PY -m lld_jax.predict --workdir="$DEMO_DIR/train" --images="$DEMO_DIR/predict_inputs" --out="$DEMO_DIR/predict" \
    --batch_size=4
$PY -m lld_jax.report --workdir="$DEMO_DIR/train" --predict_dir="$DEMO_DIR/predict" --out="$DEMO_DIR/report.md" \
    --wall_seconds=$(( $(date +%s) - start ))
echo "demo finished in $(( $(date +%s) - start )) s: see $DEMO_DIR/report.md"
