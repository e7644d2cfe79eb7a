#!/usr/bin/env bash
# One GPU job on a time-limited machine without internet (docs/gpu_window.md): the one command
# to run there, from the repository's checkout (users call it as scripts/device_window.sh).
#
#   OUT=/where/results/go bash scripts/device_window.sh BUDGET_S [window run options...]
#
# Installs the copied wheels (.whl/: what the machine's Python lacks), lays out the copied data
# (.gpu_data/), compile cache and autotune cache (.gpu_cache/), then runs `python -m tools.long_runs.window run`
# (smoke test, benchmark + torch peer, campaign sitting, packing into $OUT) under `timeout`.
# Everything, packing included, ends within BUDGET_S seconds of the start of this script: give
# the job a time limit of BUDGET_S plus its start-up and the copying back.
set -u
T0=$(date +%s)
BUDGET=${1:?usage: device_window.sh BUDGET_S [options]}
shift
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export OUT=${OUT:-/tmp/window_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/metadrop_site .whl/*.whl && export PYTHONPATH=/tmp/metadrop_site${PYTHONPATH:+:$PYTHONPATH}
  # the repo's orbax (same checkpoint format as here) unless it fails a save/restore there
  JAX_PLATFORMS=cpu $PY tools/long_runs/orbax_roundtrip.py || {
    echo "copied orbax fails here: using the installed one"; rm -rf /tmp/metadrop_site/orbax*; }
fi
[ -f .gpu_data/COMMIT ] && export METADROP_COMMIT=$(cat .gpu_data/COMMIT)
export METADROP_DATA_DIR=${METADROP_DATA_DIR:-/tmp/metadrop_data}
# METADROP_WINDOW_DATA=0 (the CPU dry-run test): leave .gpu_data/ alone
[ "${METADROP_WINDOW_DATA:-1}" = 1 ] && bash tools/long_runs/device_data.sh assemble
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/metadrop_jax_cache}
mkdir -p "$JAX_COMPILATION_CACHE_DIR"
[ -f .gpu_cache/jax_cache.tgz ] && tar xzf .gpu_cache/jax_cache.tgz -C "$JAX_COMPILATION_CACHE_DIR"
# XLA's per-fusion autotune cache of the formulations that name it (tools/long_runs/runs.py);
# the job empties it if it was tuned with another jax version or card
export METADROP_AUTOTUNE_CACHE_DIR=${METADROP_AUTOTUNE_CACHE_DIR:-/tmp/metadrop_autotune_cache}
mkdir -p "$METADROP_AUTOTUNE_CACHE_DIR"
[ -f .gpu_cache/autotune_cache.tgz ] && tar xzf .gpu_cache/autotune_cache.tgz -C "$METADROP_AUTOTUNE_CACHE_DIR"
if command -v nvidia-smi >/dev/null 2>&1; then
  # run-to-run determinism on the GPU (no autotuning, no atomics): a resumed sitting computes
  # what an uninterrupted one would; the benchmark measures its cost.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
fi
LEFT=$(( BUDGET - $(date +%s) + T0 ))
echo "device_window: $(date -u +%FT%TZ) budget ${BUDGET} s, ${LEFT} s left after setup"
timeout -k 5 $(( LEFT + 3 )) $PY -m tools.long_runs.window run --budget_s="$LEFT" --out="$OUT" "$@"
echo "device_window: exit $? after $(( $(date +%s) - T0 )) s"
ls -l "$OUT"
