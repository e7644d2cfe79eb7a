#!/usr/bin/env bash
# Adversarial robustness of trained models (docs/results.md, "Adversarial robustness"): PGD
# under l1, l2 and linf at the radii of the authors' Omniglot figure, on the query inputs of each
# model adapted on the clean support set, the same test episodes for every model; writes
# <workdir>/robustness_<norm>.json (with per-episode accuracies) and the figure. Resumable: a
# workdir whose three result files exist is skipped.
#
#   scripts/run_robustness.sh [WORKDIR ...]    # default: the four runs of results/fidelity
#
# Environment: EPISODES (test episodes per model, default 100), STEPS (PGD steps, default 20),
# RESTARTS (random starts, default 1), NORMS (default l1,l2,linf), OUT (figure, default
# docs/images/robustness.png; empty: none), PYTHON (default python).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
EPISODES=${EPISODES:-100}
STEPS=${STEPS:-20}
RESTARTS=${RESTARTS:-1}
NORMS=${NORMS:-l1,l2,linf}
OUT=${OUT-docs/images/robustness.png}
WORKDIRS=("$@")
[[ ${#WORKDIRS[@]} -gt 0 ]] || WORKDIRS=(results/fidelity/authors_maml results/fidelity/authors_metadrop
                                         results/fidelity/exact_maml results/fidelity/exact_metadrop)
for wd in "${WORKDIRS[@]}"; do
  echo "$(date -u +%FT%TZ) robustness of $wd ($EPISODES episodes, $STEPS PGD steps, $RESTARTS start(s))"
  "$PYTHON" -m metadrop_jax.cli.robustness --workdirs="$wd" --norms="$NORMS" --episodes="$EPISODES" \
      --steps="$STEPS" --restarts="$RESTARTS" --skip_existing --no_progress
done
if [[ -n "$OUT" ]]; then
  "$PYTHON" -m metadrop_jax.cli.robustness --workdirs="$(IFS=,; echo "${WORKDIRS[*]}")" \
      --norms="$NORMS" --plot_only --out="$OUT" \
      --title="PGD on the query set, $EPISODES test episodes, $STEPS steps"
fi
