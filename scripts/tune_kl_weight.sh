#!/usr/bin/env bash
# The KL weight of VIB and information dropout (config.methods.vib_beta), chosen on validation
# classes only (docs/results.md, "Method study"): each candidate trains on
# configs/omniglot_5way1shot_cpu.py with data.val_classes characters held out of the 1200
# meta-train characters, at the method study's budget, and is meta-tested on those validation
# characters (results_val.json); metadrop_jax.cli.tuning then picks, per method, the highest
# validation accuracy among the candidates whose inner loop stayed finite. The test split is not
# read. Resumable: finished steps are skipped.
#
#   scripts/tune_kl_weight.sh [METHOD ...]      # default: vib infodrop
#
# Environment: BETAS (default "1e-4 1e-5 1e-6"), COMPUTATION (meta_gradient, default authors),
# STEPS (default 1000), VAL_CLASSES (default 100), EPISODES (validation episodes, default 300),
# MC (MC samples, default 10), ROOT (default workdirs/kl_tuning), PUBLISH (a folder: each
# candidate is copied to PUBLISH/<method>_beta<beta>, the tables to PUBLISH/<method>.md; default:
# none), PYTHON (default python). Logs: ROOT/<candidate>.log.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BETAS=${BETAS:-"1e-4 1e-5 1e-6"}
COMPUTATION=${COMPUTATION:-authors}
STEPS=${STEPS:-1000}
VAL_CLASSES=${VAL_CLASSES:-100}
EPISODES=${EPISODES:-300}
MC=${MC:-10}
ROOT=${ROOT:-workdirs/kl_tuning}
METHODS=("$@")
[[ ${#METHODS[@]} -gt 0 ]] || METHODS=(vib infodrop)
mkdir -p "$ROOT"
for m in "${METHODS[@]}"; do
  wds=()
  for b in $BETAS; do
    name="${m}_beta$b"
    wd="$ROOT/$name"
    wds+=("$wd")
    if [[ ! -f "$wd/results_val.json" ]]; then
      echo "$(date -u +%FT%TZ) $name -> $wd (log: $ROOT/$name.log)"
      "$PYTHON" launch.py --config=configs/omniglot_5way1shot_cpu.py --config.method="$m" \
          --config.methods.vib_beta="$b" --config.meta_gradient="$COMPUTATION" \
          --config.data.val_classes="$VAL_CLASSES" --config.num_steps="$STEPS" \
          --config.checkpoint_every="$STEPS" --config.val_every=0 \
          --config.eval.num_episodes="$EPISODES" --config.eval.mc_samples="$MC" \
          --config.progress_bar=False --mode=train --workdir="$wd" >> "$ROOT/$name.log" 2>&1
      "$PYTHON" launch.py --mode=eval --split=val --workdir="$wd" --config.progress_bar=False \
          >> "$ROOT/$name.log" 2>&1
    fi
    if [[ -n "${PUBLISH:-}" ]]; then
      "$PYTHON" -m metadrop_jax.cli.publish --workdir="$wd" --out="$PUBLISH/$name"
    fi
  done
  "$PYTHON" -m metadrop_jax.cli.tuning --field=methods.vib_beta --workdirs="$(IFS=,; echo "${wds[*]}")" \
      --out="${PUBLISH:-$ROOT}/$m.md"
done
