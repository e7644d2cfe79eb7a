#!/usr/bin/env bash
# Regenerates the README figures in docs/images/ from training workdirs.
#
#   scripts/make_figures.sh METADROP_WORKDIR [MAML_WORKDIR [OTHER_WORKDIRS...]]
#   scripts/make_figures.sh --tiny   # exercise the pipeline: trains configs/tiny.py (Meta-dropout
#                                    # and MAML, ~1 min each on a CPU) in a temp dir first
#
# Writes (FIG_DIR, default docs/images):
#   table1.md                  results table, layout of the paper's Table 1 (all workdirs)
#   learning_curves.png        train/val accuracy and loss vs meta-iteration (all workdirs)
#   decision_boundary.png      2-way sub-task TASK (classes TASK, TASK+5 of the meta-test split),
#                              columns MAML | Meta-dropout, rows: before / after the inner loop
#   stochastic_features.png    first-block feature maps u0 of one training image, 5 noise draws
#   stochastic_features.gif    the same as an animation (one frame per draw)
# The decision-boundary arrays (.npz) go to EXPORT_DIR (default: a temp dir) so the plots can be
# redone with `python -m metadrop_jax.cli.visualize panel --npz=...`.
#
# Environment: FIG_DIR, EXPORT_DIR, PYTHON (default python), TASK (default 0), SMOOTH (moving
# average of the train curves, default 5), DATA_PATH (override config.data.path of the workdirs).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
FIG_DIR=${FIG_DIR:-docs/images}
TASK=${TASK:-0}
SMOOTH=${SMOOTH:-5}
DATA_FLAGS=()
if [[ -n "${DATA_PATH:-}" ]]; then DATA_FLAGS=(--data_path="$DATA_PATH"); fi

if [[ $# -lt 1 ]]; then
  sed -n '2,23p' "$0"; exit 2
fi

if [[ "$1" == "--tiny" ]]; then
  TINY_DIR=$(mktemp -d -t metadrop_figs_XXXX)
  for m in metadrop maml; do
    "$PYTHON" launch.py --config=configs/tiny.py --config.method=$m \
        --config.progress_bar=False --workdir="$TINY_DIR/tiny_$m" > "$TINY_DIR/$m.log" 2>&1
  done
  echo "tiny runs: $TINY_DIR"
  set -- "$TINY_DIR/tiny_metadrop" "$TINY_DIR/tiny_maml"
  SMOOTH=1
fi

METADROP=$1
MAML=${2:-}
EXPORT_DIR=${EXPORT_DIR:-$(mktemp -d -t metadrop_export_XXXX)}
mkdir -p "$FIG_DIR" "$EXPORT_DIR"
WORKDIRS=$(IFS=,; echo "$*")

# 1. table + learning curves
"$PYTHON" -m metadrop_jax.cli.report --workdirs="$WORKDIRS" --out="$FIG_DIR/table1.md" \
    --curves="$FIG_DIR/learning_curves.png" --smooth="$SMOOTH"

# 2. decision boundaries (export arrays, then the panel)
NPZ=()
LABELS=()
if [[ -n "$MAML" ]]; then
  "$PYTHON" -m metadrop_jax.cli.export --workdir="$MAML" --out="$EXPORT_DIR/maml.npz" \
      --num_tasks=$((TASK + 1)) "${DATA_FLAGS[@]}"
  NPZ+=("$EXPORT_DIR/maml.npz"); LABELS+=(MAML)
fi
"$PYTHON" -m metadrop_jax.cli.export --workdir="$METADROP" --out="$EXPORT_DIR/metadrop.npz" \
    --num_tasks=$((TASK + 1)) "${DATA_FLAGS[@]}"
NPZ+=("$EXPORT_DIR/metadrop.npz"); LABELS+=(Meta-dropout)
"$PYTHON" -m metadrop_jax.cli.visualize panel --npz="$(IFS=,; echo "${NPZ[*]}")" \
    --labels="$(IFS=,; echo "${LABELS[*]}")" --task="$TASK" --steps=0,-1 \
    --out="$FIG_DIR/decision_boundary.png"

# 3. stochastic features of one training image (Meta-dropout model)
"$PYTHON" -m metadrop_jax.cli.visualize features --workdir="$METADROP" --draws=5 \
    --out_png="$FIG_DIR/stochastic_features.png" --out_gif="$FIG_DIR/stochastic_features.gif" \
    "${DATA_FLAGS[@]}"

echo "exports: $EXPORT_DIR"
ls -l "$FIG_DIR"
for f in "$FIG_DIR"/*.png "$FIG_DIR"/*.gif; do
  if [[ $(stat -c %s "$f") -gt 204800 ]]; then echo "WARNING: $f is over 200 KB" >&2; fi
done
