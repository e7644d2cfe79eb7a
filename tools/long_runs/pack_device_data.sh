#!/usr/bin/env bash
# Stages what a GPU machine without internet needs for one job (docs/gpu_window.md), and prints
# which paths to copy there and which command to run.
#
#   bash scripts/pack_device_data.sh [--mimg [--have=PARTS --part_bytes=N]] [--budget_s=N]
#                                    [--transfer_limit_mib=N]
#
#   --mimg                  also miniImageNet (157 MB), needed once the campaign's plan reaches
#                           it (python -m tools.long_runs.campaign plan says so)
#   --have=part.00,part.01  the miniImageNet parts the GPU machine already holds, verified, and
#   --part_bytes=N          the size they were cut at (`bash tools/long_runs/device_data.sh
#                           status` prints both there): only the rest is listed to copy
#   --budget_s=N            the job's budget in seconds (default 450, 360 with --mimg: copying
#                           parts to the machine takes from the same time limit)
#   --transfer_limit_mib=N  the host's limit on one copy to the machine, checkout included
#                           (default 64; 0: none). miniImageNet is split into parts that fit.
#
# Writes (git-ignored): .gpu_data/omniglot/ (the two zips), .gpu_data/COMMIT (this commit),
# with --mimg .gpu_data/mimg/part.NN and .gpu_data/mimg/parts.json (each part's size and SHA-256:
# tools/long_runs/data_parts.py). Wheels: .whl/ (scripts/pack_device_wheels.sh); compile cache of
# the last job: .gpu_cache/ (unpack_window.sh).
# Sources: $METADROP_DATA_DIR/<name>, else ./data/<name> (where the loaders look).
set -eu
cd "$(dirname "$0")/../.."
MIMG=0; BUDGET=''; LIMIT_MIB=64; HAVE=''; PART=''
for arg in "$@"; do
  case "$arg" in
    --mimg) MIMG=1 ;;
    --have=*) HAVE=${arg#*=} ;;
    --part_bytes=*) PART=${arg#*=} ;;
    --budget_s=*) BUDGET=${arg#*=} ;;
    --transfer_limit_mib=*) LIMIT_MIB=${arg#*=} ;;
    *) sed -n '2,23p' "$0"; exit 2 ;;
  esac
done
if [ -n "$HAVE" ] && [ -z "$PART" ]; then
  echo "error: --have=$HAVE needs the --part_bytes those parts were cut at: copy both from what" \
       "device_data.sh status printed on the GPU machine" >&2
  exit 2
fi
if [ -z "$BUDGET" ]; then BUDGET=450; if [ $MIMG = 1 ]; then BUDGET=360; fi; fi
SRC=${METADROP_DATA_DIR:-data}
if [ ! -f "$SRC/omniglot/images_background.zip" ]; then
  echo "error: $SRC/omniglot/images_background.zip not found: set METADROP_DATA_DIR to the folder" \
       "that holds omniglot/ (and miniimagenet/), see docs/data.md" >&2
  exit 2
fi
mkdir -p .gpu_data/omniglot
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!results' 2>/dev/null || echo -dirty)" > .gpu_data/COMMIT
cp "$SRC/omniglot/images_background.zip" "$SRC/omniglot/images_evaluation.zip" .gpu_data/omniglot/
size() { du -cb "$@" 2>/dev/null | tail -1 | cut -f1; }
# the checkout: tracked + untracked-not-ignored files
TREE=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
WHL=$(size .whl); WHL=${WHL:-0}
OMNI=$(size .gpu_data/omniglot)
CACHE=$(size .gpu_cache); CACHE=${CACHE:-0}
JOB=$((TREE + WHL + OMNI + CACHE))
LIMIT=$((LIMIT_MIB * 1024 * 1024))
if [ "$WHL" -eq 0 ]; then echo "warning: no .whl/: run bash scripts/pack_device_wheels.sh first"; fi
COPY=".whl .gpu_data/omniglot .gpu_data/COMMIT"
if [ -f .gpu_cache/jax_cache.tgz ] || [ -f .gpu_cache/autotune_cache.tgz ]; then COPY="$COPY .gpu_cache"; fi
PARTS_APART=()
rm -rf .gpu_data/mimg
if [ $MIMG = 1 ]; then
  Z="$SRC/miniimagenet/miniimagenet_84x84.zip"
  [ -f "$Z" ] || { echo "error: $Z not found (docs/data.md)" >&2; exit 2; }
  mkdir -p .gpu_data/mimg
  if [ -n "$PART" ]; then
    :
  elif [ "$LIMIT" -gt 0 ]; then
    # one copy carries the checkout, the sums and one part: leave 2 MiB of slack
    PART=$(( (LIMIT - TREE - 2 * 1024 * 1024) / 1048576 * 1048576 ))
  else
    PART=$(stat -c %s "$Z")
  fi
  ${PYTHON:-python} -m tools.long_runs.data_parts split "$Z" .gpu_data/mimg --part_bytes="$PART" >/dev/null
  COPY="$COPY .gpu_data/mimg/parts.json"
  LAST=$(ls .gpu_data/mimg/part.* | tail -1)
  LASTB=$(stat -c %s "$LAST")
  for p in .gpu_data/mimg/part.*; do
    case ",$HAVE," in *",$(basename "$p"),"*) continue ;; esac
    if [ "$p" = "$LAST" ] && { [ "$LIMIT" -eq 0 ] || [ $((JOB + LASTB + 1048576)) -lt $LIMIT ]; }; then
      COPY="$COPY $p"; JOB=$((JOB + LASTB)); continue
    fi
    PARTS_APART+=("$p")
  done
  echo "miniImageNet: $(ls .gpu_data/mimg/part.* | wc -l) part(s) of <= ${PART} B${HAVE:+; the machine holds $HAVE}"
fi
echo "checkout ${TREE} B, wheels ${WHL} B, omniglot ${OMNI} B, compile cache ${CACHE} B"
if [ "$LIMIT" -gt 0 ] && [ $JOB -ge $LIMIT ]; then
  echo "warning: the job's files ($JOB B) exceed the transfer limit ($LIMIT B)"
fi
echo
echo "On the GPU machine, in a checkout of commit $(cat .gpu_data/COMMIT):"
n=1
for p in ${PARTS_APART[@]+"${PARTS_APART[@]}"}; do
  echo "$n. copy .gpu_data/mimg/parts.json and $p there, then run there:"
  echo "     bash tools/long_runs/device_data.sh stash"
  n=$((n + 1))
done
echo "$n. copy these paths there ($JOB B with the checkout): $COPY"
echo "$((n + 1)). run there, in a job with a time limit of at least $((BUDGET + 50)) s:"
echo "     OUT=/path/for/results bash scripts/device_window.sh $BUDGET"
echo "$((n + 2)). copy \$OUT back here and run: bash scripts/unpack_window.sh DIR"
