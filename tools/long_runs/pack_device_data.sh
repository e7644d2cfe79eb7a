#!/usr/bin/env bash
# Data (and the commit id) for a GPU window, into .gpu_data/ (git-ignored; carried).
#
#   bash tools/long_runs/pack_device_data.sh            # Omniglot's two zips (14 MB) + COMMIT
#   bash tools/long_runs/pack_device_data.sh --mimg     # also miniImageNet's zip, split into parts that
#                                               # each fit one call beside the tree and the wheels
#
# Sources: $METADROP_DATA_DIR/<name>, else ../shared/data/<name> (as the loaders look).
set -eu
cd "$(dirname "$0")/../.."
SRC=${METADROP_DATA_DIR:-../shared/data}
LIMIT=$((64 * 1024 * 1024))
mkdir -p .gpu_data/omniglot
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!results' 2>/dev/null || echo -dirty)" > .gpu_data/COMMIT
cp "$SRC/omniglot/images_background.zip" "$SRC/omniglot/images_evaluation.zip" .gpu_data/omniglot/
# what every call carries anyway: tracked + untracked-not-ignored files, and the wheels
TREE=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
WHL=$(du -cb .whl 2>/dev/null | tail -1 | cut -f1); WHL=${WHL:-0}
OMNI=$(du -cb .gpu_data/omniglot | tail -1 | cut -f1)
CACHE=$(du -cb .gpu_cache 2>/dev/null | tail -1 | cut -f1); CACHE=${CACHE:-0}
echo "tree ${TREE} B, wheels ${WHL} B, omniglot ${OMNI} B, compile cache ${CACHE} B"
echo "window call carries $((TREE + WHL + OMNI + CACHE)) of ${LIMIT} B"
if [ "${1:-}" != "--mimg" ]; then
  rm -rf .gpu_data/mimg      # not asked for this window: no upload calls
else
  Z="$SRC/miniimagenet/miniimagenet_84x84.zip"
  rm -rf .gpu_data/mimg && mkdir -p .gpu_data/mimg
  # an upload call carries the tree, the sums and one part: leave 2 MiB of slack
  PART=$(( LIMIT - TREE - 2 * 1024 * 1024 ))
  PART=$(( PART / 1048576 * 1048576 ))
  split -b "$PART" -d -a 2 "$Z" .gpu_data/mimg/part.
  (cd .gpu_data/mimg && sha256sum part.* > SHA256SUMS && sha256sum "$Z" | sed "s# .*# miniimagenet_84x84.zip#" >> SHA256SUMS)
  ls -l .gpu_data/mimg
  echo "miniImageNet: $(ls .gpu_data/mimg/part.* | wc -l) parts of <= ${PART} B"
fi
# The device calls, in order (docs/gpu_window.md): uploads first, the window last.
CARRY='".whl", ".gpu_data/omniglot", ".gpu_data/COMMIT"'
[ -f .gpu_cache/jax_cache.tgz ] && CARRY="$CARRY, \".gpu_cache\""
WINDOW=$((TREE + WHL + OMNI + CACHE))
if [ -d .gpu_data/mimg ]; then
  CARRY="$CARRY, \".gpu_data/mimg/SHA256SUMS\""
  LAST=$(ls .gpu_data/mimg/part.* | tail -1)
  LASTB=$(stat -c %s "$LAST")
  for p in .gpu_data/mimg/part.*; do
    if [ "$p" = "$LAST" ] && [ $((WINDOW + LASTB + 1048576)) -lt $LIMIT ]; then
      CARRY="$CARRY, \"$p\""; WINDOW=$((WINDOW + LASTB)); continue
    fi
    echo "upload call: command='bash tools/long_runs/device_data.sh stash' carry=[\".gpu_data/mimg/SHA256SUMS\", \"$p\"] timeout_s=120"
  done
fi
BUDGET=450; [ -d .gpu_data/mimg ] && BUDGET=360   # the uploads' device time comes off the 15 min
echo "window call: command='bash tools/long_runs/device_window.sh $BUDGET' carry=[$CARRY] timeout_s=$((BUDGET + 50))   ($WINDOW B)"
echo "then give_back, and here: python -m tools.long_runs.window unpack <files_at>"
