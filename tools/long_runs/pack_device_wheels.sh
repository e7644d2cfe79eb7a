#!/usr/bin/env bash
# Wheels for what the GPU image lacks, into .whl/ (git-ignored; carried with the window call).
#
#   bash tools/long_runs/pack_device_wheels.sh
#
# The image (Python 3.12) has jax 0.11 with CUDA, flax, optax, orbax-checkpoint, absl-py, chex,
# tqdm, matplotlib, scikit-learn, pillow, PyYAML; it lacks ml_collections (configs). orbax-checkpoint
# is carried at this environment's version so that both sides write and read checkpoints with the
# same code (device_window.sh falls back to the image's if it does not import there).
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
echo "wheels: $(du -cb .whl/*.whl | tail -1 | cut -f1) bytes ($PKGS)"
