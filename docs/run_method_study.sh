#!/usr/bin/env bash
# Short real-data runs of every method (docs/results.md, "Method study"): each config.method on
# configs/omniglot_5way1shot_cpu.py with the same reduced budget, one after the other, then the
# results table of all of them (scripts/run_study.sh does the work; rerun to resume).
#
#   docs/run_method_study.sh [METHOD ...]     # default: every method in metadrop_jax.config.METHODS
#
# Environment: STEPS (meta-iterations, default 1000), EPISODES (meta-test episodes, default 500),
# MC (meta-test MC samples, default 10), ROOT (workdir root, default workdirs/method_study),
# PYTHON (default python). Logs ROOT/<method>.log; table ROOT/table.md; figures
# ROOT/accuracy.png (accuracy ± 95% CI per method), ROOT/curves.png (learning curves).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-1000}
EPISODES=${EPISODES:-500}
MC=${MC:-10}
ROOT=${ROOT:-workdirs/method_study}
if [[ $# -eq 0 ]]; then
  read -r -a METHODS <<< "$("$PYTHON" -c 'from metadrop_jax import config; print(*config.METHODS)')"
else
  METHODS=("$@")
fi
RUNS=()
for m in "${METHODS[@]}"; do RUNS+=("$m=--config.method=$m"); done
EXTRA="--config.num_steps=$STEPS --config.checkpoint_every=$STEPS
  --config.eval.num_episodes=$EPISODES --config.eval.mc_samples=$MC" \
TITLE="configs/omniglot_5way1shot_cpu.py, $EPISODES test episodes, $MC MC samples at meta-test" \
  exec scripts/run_study.sh "$ROOT" configs/omniglot_5way1shot_cpu.py "${RUNS[@]}"
