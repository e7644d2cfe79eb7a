#!/usr/bin/env bash
# bash scripts/pack_device_wheels.sh
# The long-run tooling lives in tools/long_runs/ (docs/gpu_window.md): this runs its pack_device_wheels.sh.
exec bash "$(dirname "$0")/../tools/long_runs/pack_device_wheels.sh" "$@"
