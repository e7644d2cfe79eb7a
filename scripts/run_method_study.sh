#!/usr/bin/env bash
# Method study in one meta-gradient computation (docs/results.md, "Method study"): each
# config.method on configs/omniglot_5way1shot_cpu.py with the same reduced budget and
# --config.meta_gradient pinned to COMPUTATION, trained and meta-tested one after the other on the
# same test episodes (eval seed 0). Resumable: a run whose results.json exists is skipped, an
# unfinished one resumes from its last checkpoint.
#
#   scripts/run_method_study.sh COMPUTATION [RUN ...]
#
# COMPUTATION: authors | exact | first_order (metadrop_jax.config.META_GRADIENTS).
# RUN: a method name (metadrop_jax.config.METHODS; default: all of them), or NAME="OVERRIDES" for
# an extra row, e.g. vib_beta1e-5="--config.method=vib --config.methods.vib_beta=1e-5".
# Environment: STEPS (meta-iterations, default 1000), EPISODES (meta-test episodes, default 500),
# MC (meta-test MC samples, default 10), ROOT (workdir root, default
# workdirs/method_study/COMPUTATION), PUBLISH (a folder: each finished run's config, metrics, run
# log, results, per-episode accuracies and last checkpoint are copied to PUBLISH/NAME; default:
# none), PYTHON (default python). Logs: ROOT/NAME.log.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
[[ $# -ge 1 ]] || { sed -n '2,18p' "$0"; exit 2; }
COMPUTATION=$1; shift
"$PYTHON" -c "import sys; from metadrop_jax import config as c; \
sys.exit(0 if sys.argv[1] in c.META_GRADIENTS else \
f'error: {sys.argv[1]!r} is no meta_gradient: choose one of {c.META_GRADIENTS}')" "$COMPUTATION"
STEPS=${STEPS:-1000}
EPISODES=${EPISODES:-500}
MC=${MC:-10}
ROOT=${ROOT:-workdirs/method_study/$COMPUTATION}
if [[ $# -eq 0 ]]; then
  read -r -a RUNS <<< "$("$PYTHON" -c 'from metadrop_jax import config; print(*config.METHODS)')"
else
  RUNS=("$@")
fi
mkdir -p "$ROOT"
for spec in "${RUNS[@]}"; do
  if [[ $spec == *=* ]]; then name=${spec%%=*}; overrides=${spec#*=}
  else name=$spec; overrides="--config.method=$spec"; fi
  wd="$ROOT/$name"
  if [[ ! -f "$wd/results.json" ]]; then
    echo "$(date -u +%FT%TZ) $COMPUTATION/$name -> $wd (log: $ROOT/$name.log)"
    # shellcheck disable=SC2086  # overrides are whitespace-separated flags
    "$PYTHON" launch.py --config=configs/omniglot_5way1shot_cpu.py $overrides \
        --config.meta_gradient="$COMPUTATION" --config.num_steps="$STEPS" \
        --config.checkpoint_every="$STEPS" --config.eval.num_episodes="$EPISODES" \
        --config.eval.mc_samples="$MC" --config.progress_bar=False --mode=train_eval \
        --workdir="$wd" >> "$ROOT/$name.log" 2>&1 || echo "$COMPUTATION/$name failed: $ROOT/$name.log"
  fi
  if [[ -n "${PUBLISH:-}" && -f "$wd/results.json" ]]; then
    "$PYTHON" -m metadrop_jax.cli.publish --workdir="$wd" --out="$PUBLISH/$name"
  fi
done
