#!/usr/bin/env bash
# After a GPU job: put the files it brought back in place (docs/gpu_window.md), then commit.
#
#   bash scripts/unpack_window.sh DIR     # DIR: the job's $OUT, copied back here
#
# = python -m tools.long_runs.window unpack DIR [--force=...] [--skip=...]: checks and stages the
# returned files, keeps the newer state of each run in results/table1/ (tools/long_runs/unpack.py),
# stores window.json and the log in docs/bench/windows/, regenerates the campaign tables and the
# generated blocks of docs/results.md and docs/performance.md, keeps the compile cache in
# .gpu_cache/ (git-ignored) for the next job.
set -eu
args=()
for a in "$@"; do   # a folder given relative to where this was called from
  if [[ $a != -* && -e $a ]]; then a=$(realpath -- "$a"); fi
  args+=("$a")
done
cd "$(dirname "$0")/../.."
${PYTHON:-python} -m tools.long_runs.window unpack "${args[@]}"
echo "now: git add results/table1 docs/bench/windows docs/results.md docs/performance.md && git commit"
