#!/usr/bin/env bash
# A study: several short real-data runs of one config that differ in a few overrides, trained and
# meta-tested one after the other, then one results table, accuracy bars and learning curves.
#
#   scripts/run_study.sh ROOT CONFIG NAME="--config.x=a --config.y=b" [NAME="..." ...]
#
# Each NAME becomes the workdir ROOT/NAME, trained with CONFIG plus its overrides plus the shared
# EXTRA overrides. A run whose ROOT/NAME/results.json exists is skipped and training resumes
# from the last checkpoint, so an interrupted study continues by rerunning the same command.
# Environment: PYTHON (default python), EXTRA (overrides for every run), MODE (launch.py mode,
# default train_eval; 'train' skips the meta-test), TITLE (figure title). Logs: ROOT/NAME.log;
# table ROOT/table.md, figures ROOT/accuracy.png and ROOT/curves.png.
# Used by scripts/run_fidelity_study.sh.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODE=${MODE:-train_eval}
[[ $# -ge 3 ]] || { echo "usage: $0 ROOT CONFIG NAME=\"OVERRIDES\" ..." >&2; exit 2; }
ROOT=$1; CONFIG=$2; shift 2
mkdir -p "$ROOT"
DONE=()
for spec in "$@"; do
  name=${spec%%=*}
  overrides=${spec#*=}
  wd="$ROOT/$name"
  if [[ ! -f "$wd/results.json" ]]; then
    echo "$(date -u +%H:%M:%S) $name -> $wd (log: $ROOT/$name.log)"
    # shellcheck disable=SC2086  # overrides are whitespace-separated flags
    "$PYTHON" launch.py --config="$CONFIG" $overrides ${EXTRA:-} --mode="$MODE" \
        --config.progress_bar=False --workdir="$wd" >> "$ROOT/$name.log" 2>&1
  fi
  [[ -f "$wd/results.json" ]] && DONE+=("$wd")
done
[[ ${#DONE[@]} -gt 0 ]] || { echo "no run has results yet (MODE=$MODE)"; exit 0; }
"$PYTHON" -m metadrop_jax.cli.report --workdirs="$(IFS=,; echo "${DONE[*]}")" --out="$ROOT/table.md" \
    --bars="$ROOT/accuracy.png" --curves="$ROOT/curves.png" --smooth=5 --title="${TITLE:-$CONFIG}"
