#!/usr/bin/env bash
# Short real-data runs of every method (docs/results.md, "Method study"): each config.method on
# configs/omniglot_5way1shot_cpu.py with the same reduced budget, one after the other, then the
# results table of all of them.
#
#   docs/run_method_study.sh [METHOD ...]     # default: every method in metadrop_jax.config.METHODS
#
# Environment: STEPS (meta-iterations, default 1000), EPISODES (meta-test episodes, default 500),
# MC (meta-test MC samples, default 10), ROOT (workdir root, default workdirs/method_study),
# PYTHON (default python). A method whose ROOT/<method>/results.json exists is skipped, so an
# interrupted study resumes by rerunning the same command (training itself resumes from the
# last checkpoint too). Logs: ROOT/<method>.log. Table: ROOT/table.md; figures:
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
mkdir -p "$ROOT"
DONE=()
for m in "${METHODS[@]}"; do
  wd="$ROOT/$m"
  if [[ ! -f "$wd/results.json" ]]; then
    echo "$(date -u +%H:%M:%S) $m -> $wd (log: $ROOT/$m.log)"
    "$PYTHON" launch.py --config=configs/omniglot_5way1shot_cpu.py --config.method="$m" \
        --config.num_steps="$STEPS" --config.checkpoint_every="$STEPS" \
        --config.eval.num_episodes="$EPISODES" --config.eval.mc_samples="$MC" \
        --config.progress_bar=False --workdir="$wd" > "$ROOT/$m.log" 2>&1
  fi
  DONE+=("$wd")
done
"$PYTHON" -m metadrop_jax.report --workdirs="$(IFS=,; echo "${DONE[*]}")" --out="$ROOT/table.md" \
    --bars="$ROOT/accuracy.png" --curves="$ROOT/curves.png" --smooth=5 \
    --title="configs/omniglot_5way1shot_cpu.py, $EPISODES test episodes, $MC MC samples at meta-test"
