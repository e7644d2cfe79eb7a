#!/usr/bin/env bash
# bash scripts/pack_device_data.sh [--mimg] [--budget_s=N] [--transfer_limit_mib=N]
# The long-run tooling lives in tools/long_runs/ (docs/gpu_window.md): this runs its pack_device_data.sh.
exec bash "$(dirname "$0")/../tools/long_runs/pack_device_data.sh" "$@"
