#!/usr/bin/env bash
# bash scripts/unpack_window.sh DIR
# The long-run tooling lives in tools/long_runs/ (docs/gpu_window.md): this runs its unpack_window.sh.
exec bash "$(dirname "$0")/../tools/long_runs/unpack_window.sh" "$@"
