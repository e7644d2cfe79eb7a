#!/usr/bin/env bash
# The paper's question in both meta-gradients (docs/results.md, "Which meta-gradient"): MAML and
# Meta-dropout, each with the exact meta-gradient and with the authors' (batch-norm backward
# constant to the outer gradient), on configs/omniglot_5way1shot_cpu.py with the same episodes
# and the full meta-test protocol (1000 episodes, 30 MC samples). Resumable: rerun to continue.
#
#   scripts/run_fidelity_study.sh            # STEPS (default 2000), ROOT (default workdirs/fidelity)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-2000}
ROOT=${ROOT:-workdirs/fidelity}
EXTRA="--config.num_steps=$STEPS ${EXTRA:-}" \
TITLE=${TITLE:-"Omniglot 5-way 1-shot (CPU config), $STEPS steps: exact vs authors' meta-gradient"} \
  exec scripts/run_study.sh "$ROOT" configs/omniglot_5way1shot_cpu.py \
    authors_metadrop="--config.method=metadrop --config.meta_gradient=authors" \
    authors_maml="--config.method=maml --config.meta_gradient=authors" \
    exact_maml="--config.method=maml --config.meta_gradient=exact" \
    exact_metadrop="--config.method=metadrop --config.meta_gradient=exact" \
    "$@"
