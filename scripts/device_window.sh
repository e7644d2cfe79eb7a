#!/usr/bin/env bash
# OUT=DIR bash scripts/device_window.sh BUDGET_S [options]   # on the GPU machine
# The long-run tooling lives in tools/long_runs/ (docs/gpu_window.md): this runs its device_window.sh.
exec bash "$(dirname "$0")/../tools/long_runs/device_window.sh" "$@"
