#!/usr/bin/env bash
# Data on the GPU machine (docs/gpu_window.md).
#
#   bash tools/long_runs/device_data.sh stash     # after copying one miniImageNet part there: move
#                                                 # it out of the checkout into /tmp/metadrop_parts
#                                                 # (sha256 checked), where the next copy of the
#                                                 # checkout cannot touch it
#   bash tools/long_runs/device_data.sh assemble  # at the job's start (device_window.sh): the
#                                                 # Omniglot zips and, when every part is there,
#                                                 # the miniImageNet zip into $METADROP_DATA_DIR
set -u
cd "$(dirname "$0")/../.."
PARTS=${METADROP_PARTS_DIR:-/tmp/metadrop_parts}
DATA=${METADROP_DATA_DIR:-/tmp/metadrop_data}
SUMS=.gpu_data/mimg/SHA256SUMS
mkdir -p "$PARTS" "$DATA"
stash() {
  [ -f "$SUMS" ] || { echo "no $SUMS"; return 0; }
  cp "$SUMS" "$PARTS/SHA256SUMS"
  for p in .gpu_data/mimg/part.*; do
    [ -f "$p" ] || continue
    n=$(basename "$p")
    want=$(grep " $n\$" "$SUMS" | cut -d' ' -f1)
    got=$(sha256sum "$p" | cut -d' ' -f1)
    if [ "$want" = "$got" ]; then cp "$p" "$PARTS/$n"; echo "stashed $n ($(stat -c %s "$PARTS/$n") bytes)";
    else echo "BAD $n: sha256 $got, expected $want"; fi
  done
  ls "$PARTS"
}
case "${1:-}" in
  stash) stash ;;
  assemble)
    if ls .gpu_data/omniglot/*.zip >/dev/null 2>&1; then
      mkdir -p "$DATA/omniglot" && cp .gpu_data/omniglot/*.zip "$DATA/omniglot/"
      echo "omniglot: $(ls "$DATA/omniglot" | tr '\n' ' ')"
    fi
    stash >/dev/null
    z="$DATA/miniimagenet/miniimagenet_84x84.zip"
    if [ -f "$PARTS/SHA256SUMS" ] && [ ! -f "$z" ]; then
      need=$(grep -c ' part\.' "$PARTS/SHA256SUMS")
      have=$(ls "$PARTS"/part.* 2>/dev/null | wc -l)
      if [ "$need" = "$have" ]; then
        mkdir -p "$DATA/miniimagenet"
        cat "$PARTS"/part.* > "$z.tmp"
        want=$(grep ' miniimagenet_84x84.zip$' "$PARTS/SHA256SUMS" | cut -d' ' -f1)
        if [ "$(sha256sum "$z.tmp" | cut -d' ' -f1)" = "$want" ]; then mv "$z.tmp" "$z"; echo "miniimagenet: zip assembled";
        else rm -f "$z.tmp"; echo "miniimagenet: assembled zip has the wrong sha256"; fi
      else
        echo "miniimagenet: $have of $need parts here (machine restarted since they were copied?): not used"
      fi
    fi
    [ -f "$z" ] && echo "miniimagenet: $z" || true
    ;;
  *) echo "usage: $0 stash|assemble"; exit 2 ;;
esac
