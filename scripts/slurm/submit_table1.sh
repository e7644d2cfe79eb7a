#!/usr/bin/env bash
# Table 1 on a SLURM cluster: the array job (scripts/slurm/table1.sbatch, one task per run) and
# the report job that builds DIR/table1.md once every task has ended.
#
#   scripts/slurm/submit_table1.sh DIR [sbatch options of the array, e.g. --partition=gpu]
#
# DIR: the runs folder on the shared filesystem (one workdir per run, logs/, table1.md).
# Environment: TABLE1_OPTIONS, the run list's options (e.g. "--gradients=authors --seeds=0,1";
# python -m tools.long_runs.slurm runs --help), TABLE1_PARALLEL (tasks at once, default 4),
# PYTHON (default: python). The jobs inherit this environment.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR [sbatch options]" >&2; exit 2; }
cd "$(dirname "$0")/../.."
mkdir -p "$1/logs"
export TABLE1_DIR; TABLE1_DIR=$(cd "$1" && pwd); shift
py=${PYTHON:-python}
n=$("$py" -m tools.long_runs.slurm runs --count ${TABLE1_OPTIONS:-})
array=$(sbatch --parsable --array="0-$((n - 1))%${TABLE1_PARALLEL:-4}" \
  --output="$TABLE1_DIR/logs/table1_%A_%a.log" "$@" scripts/slurm/table1.sbatch)
array=${array%%;*}
report=$(sbatch --parsable --dependency="afterany:$array" \
  --output="$TABLE1_DIR/logs/table1_report_%j.log" scripts/slurm/table1_report.sbatch)
report=${report%%;*}
echo "array job $array ($n runs), report job $report; logs in $TABLE1_DIR/logs, the table in" \
  "$TABLE1_DIR/table1.md (squeue -j $array,$report)"
