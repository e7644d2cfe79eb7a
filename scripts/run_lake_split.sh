#!/usr/bin/env bash
# MAML and Meta-dropout on Omniglot's Lake background / evaluation split (docs/results.md, "Lake
# split"): configs/omniglot_5way1shot_cpu.py with --config.data.omniglot_split=lake, the authors'
# meta-gradient pinned, then the meta-test on the 659 evaluation characters with rotations (by
# default the full protocol: 1000 episodes, 30 MC samples). Resumable: a run whose results.json exists is
# skipped, an unfinished one resumes from its last checkpoint.
#
#   scripts/run_lake_split.sh [METHOD ...]        # default: maml metadrop
#
# Environment: STEPS (default 2000), EPISODES (meta-test episodes, default 1000), MC (meta-test MC
# samples, default 30), COMPUTATION (meta_gradient, default authors), ROOT (default
# workdirs/lake_split), PUBLISH (a folder: each finished run is copied to PUBLISH/<computation>_<method>
# by metadrop_jax.cli.publish; default: none), EXTRA (more overrides for every run, e.g.
# --config.seed=1), PYTHON (default python). Logs: ROOT/<run>.log.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-2000}
EPISODES=${EPISODES:-1000}
MC=${MC:-30}
COMPUTATION=${COMPUTATION:-authors}
ROOT=${ROOT:-workdirs/lake_split}
METHODS=("$@")
[[ ${#METHODS[@]} -gt 0 ]] || METHODS=(maml metadrop)
mkdir -p "$ROOT"
for m in "${METHODS[@]}"; do
  name="${COMPUTATION}_$m"
  wd="$ROOT/$name"
  if [[ ! -f "$wd/results.json" ]]; then
    echo "$(date -u +%FT%TZ) $name -> $wd (log: $ROOT/$name.log)"
    "$PYTHON" launch.py --config=configs/omniglot_5way1shot_cpu.py --config.method="$m" \
        --config.meta_gradient="$COMPUTATION" --config.data.omniglot_split=lake \
        --config.num_steps="$STEPS" --config.eval.num_episodes="$EPISODES" \
        --config.eval.mc_samples="$MC" --config.progress_bar=False --mode=train_eval ${EXTRA:-} \
        --workdir="$wd" >> "$ROOT/$name.log" 2>&1 || echo "$name failed: $ROOT/$name.log"
  fi
  if [[ -n "${PUBLISH:-}" && -f "$wd/results.json" ]]; then
    "$PYTHON" -m metadrop_jax.cli.publish --workdir="$wd" --out="$PUBLISH/$name"
  fi
done
