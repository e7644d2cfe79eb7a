#!/usr/bin/env bash
# Wheels for what the GPU machine's Python lacks, into .whl/ (git-ignored; copy it there with
# the checkout: the machine has no internet).
#
#   bash scripts/pack_device_wheels.sh
#
# Made for a machine with Python 3.12 that has jax with CUDA, flax, optax, orbax-checkpoint,
# absl-py, chex, tqdm, matplotlib, scikit-learn, pillow and PyYAML, and lacks ml_collections
# (configs); edit PKGS below for another machine. orbax-checkpoint is copied
# at this environment's version so that both sides write and read checkpoints with the same code
# (device_window.sh falls back to the machine's own if a save/restore fails there).
# tensorboardX is left out on purpose: no event files are written there (metrics.jsonl only).
set -eu
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
ver() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
PKGS="ml_collections==$(ver ml_collections) orbax-checkpoint==$(ver orbax-checkpoint)"
rm -rf .whl && mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $PKGS
ls -l .whl
echo "wheels: $(du -cb .whl/*.whl | tail -1 | cut -f1) bytes ($PKGS) in .whl/"
echo "next: bash scripts/pack_device_data.sh (it says what to copy to the GPU machine)"
