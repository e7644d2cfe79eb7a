#!/usr/bin/env bash
# A pipeline check of miniImageNet on a CPU, never a Table-1 number: configs/mimgnet_5way1shot.py
# on the real data for a few hundred meta-iterations (reduced budget and meta learning rate,
# both recorded in each run's config.json), validated on the 16 validation classes as it trains,
# then meta-tested on a short protocol. It shows that the design card's command learns: the
# training loss falls and the accuracy is above chance (20 % for 5-way). Resumable: a run whose
# results.json exists is skipped; an unfinished one resumes from its last checkpoint.
#
#   scripts/run_mimgnet_pipeline_check.sh [METHOD ...]     # default: metadrop maml
#
# Environment: DATA (miniimagenet_84x84.zip or a folder holding it; default: where the loaders
# look, $METADROP_DATA_DIR/miniimagenet or ./data/miniimagenet), STEPS (default 300), META_LR (default 1e-3: ten times the
# authors' 1e-4, which hardly moves a model in a few hundred steps), EPISODES (meta-test episodes,
# default 300), MC (meta-test MC samples, default 10), ROOT (default workdirs/mimgnet_pipeline),
# PUBLISH (a folder: each finished run is copied to PUBLISH/<method> by metadrop_jax.cli.publish),
# PYTHON (default python). Logs: ROOT/<method>.log.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA=${DATA:-}
STEPS=${STEPS:-300}
META_LR=${META_LR:-1e-3}
EPISODES=${EPISODES:-300}
MC=${MC:-10}
ROOT=${ROOT:-workdirs/mimgnet_pipeline}
METHODS=("$@")
[[ ${#METHODS[@]} -gt 0 ]] || METHODS=(metadrop maml)
mkdir -p "$ROOT"
for m in "${METHODS[@]}"; do
  wd="$ROOT/$m"
  if [[ ! -f "$wd/results.json" ]]; then
    echo "$(date -u +%FT%TZ) $m -> $wd (log: $ROOT/$m.log)"
    "$PYTHON" launch.py --config=configs/mimgnet_5way1shot.py --config.method="$m" \
        ${DATA:+--config.data.path="$DATA"} --config.num_steps="$STEPS" --config.meta_lr="$META_LR" \
        --config.log_every=10 --config.val_every=50 --config.eval.val_episodes=100 \
        --config.checkpoint_every=50 --config.eval.num_episodes="$EPISODES" \
        --config.eval.mc_samples="$MC" --config.progress_bar=False --mode=train_eval \
        --workdir="$wd" >> "$ROOT/$m.log" 2>&1 || echo "$m failed: $ROOT/$m.log"
  fi
  if [[ -n "${PUBLISH:-}" && -f "$wd/results.json" ]]; then
    "$PYTHON" -m metadrop_jax.cli.publish --workdir="$wd" --out="$PUBLISH/$m"
  fi
done
