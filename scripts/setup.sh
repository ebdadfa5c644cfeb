#!/usr/bin/env bash
# Creates .venv and installs lowbit with its dependencies, once. A repeated call only compares a
# stamp (the hash of pyproject.toml) and returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lowbit-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "lowbit: installing dependencies into .venv (first run only) ..." >&2
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
  # The fused C++ kernels, compiled here (about a minute) rather than by the first command or
  # test that needs them; without a compiler lowbit says so and runs its PyTorch path.
  .venv/bin/python -c "from lowbit import kernels; kernels.available()"
  echo "$want" > "$stamp"
fi
