#!/usr/bin/env bash
# Data on the GPU machine (docs/gpu_window.md); miniImageNet arrives in parts
# (tools/long_runs/data_parts.py: each part's SHA-256 checked where it lands and again where the
# zip is assembled).
#
#   bash tools/long_runs/device_data.sh stash     # after a copy that brought miniImageNet parts:
#                                                 # move the verified ones out of the checkout into
#                                                 # $METADROP_PARTS_DIR (/tmp/metadrop_parts), where
#                                                 # the next copy cannot touch them; prints which
#                                                 # parts are still needed
#   bash tools/long_runs/device_data.sh status    # which parts are here, which are still needed
#   bash tools/long_runs/device_data.sh assemble  # at the job's start (device_window.sh): the
#                                                 # Omniglot zips and, when every part is here and
#                                                 # verified, the miniImageNet zip into
#                                                 # $METADROP_DATA_DIR; never a partial one
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
PARTS=${METADROP_PARTS_DIR:-/tmp/metadrop_parts}
DATA=${METADROP_DATA_DIR:-/tmp/metadrop_data}
ARRIVE=.gpu_data/mimg
parts() { $PY -m tools.long_runs.data_parts "$@"; }
have_parts() { [ -f "$ARRIVE/parts.json" ] || [ -f "$PARTS/parts.json" ]; }
case "${1:-}" in
  stash)
    if [ -f "$ARRIVE/parts.json" ]; then parts stash "$ARRIVE" "$PARTS"
    else echo "no $ARRIVE/parts.json here: nothing to stash"; fi ;;
  status)
    if have_parts; then parts status "$ARRIVE" "$PARTS"
    else echo "no miniImageNet parts here"; fi ;;
  assemble)
    if ls .gpu_data/omniglot/*.zip >/dev/null 2>&1; then
      mkdir -p "$DATA/omniglot" && cp .gpu_data/omniglot/*.zip "$DATA/omniglot/"
      echo "omniglot: $(ls "$DATA/omniglot" | tr '\n' ' ')"
    fi
    z="$DATA/miniimagenet/miniimagenet_84x84.zip"
    if [ -f "$z" ]; then
      echo "miniimagenet: $z (assembled earlier)"
    elif have_parts; then
      [ -f "$ARRIVE/parts.json" ] && parts stash "$ARRIVE" "$PARTS" >/dev/null
      # the folder appears only with the whole, verified zip in it: a run never sees a partial one
      tmpdir="$DATA/.miniimagenet.assembling"
      if parts assemble "$PARTS" "$tmpdir/miniimagenet_84x84.zip" --arrive="$ARRIVE"; then
        rm -rf "$DATA/miniimagenet" && mv "$tmpdir" "$DATA/miniimagenet"
      else
        rm -rf "$tmpdir"
        echo "miniimagenet: not here this job (the runs that need it are skipped)"
      fi
    fi
    ;;
  *) echo "usage: $0 stash|status|assemble"; exit 2 ;;
esac
