#!/usr/bin/env bash
# Set-up plus the main job on the embedded default. Extra arguments go to `lowbit train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lowbit train "$@"
