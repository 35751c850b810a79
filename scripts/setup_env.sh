#!/usr/bin/env bash
# Creates .venv (if needed) and installs lld-jax with its pinned dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# uv installs the same pinned packages in a fraction of pip's time (on the 2-core machine, about 30 s against 2.5
# minutes for a new .venv). It reads no pip configuration (set UV_INDEX_URL for a mirror), so where it cannot be
# installed or cannot reach the index, pip does the install.
if { [ -x .venv/bin/uv ] || .venv/bin/pip install -q "uv==0.13.9"; } \
    && .venv/bin/uv pip install -q --python .venv/bin/python -e ".[test]"; then
  exit 0
fi
echo "setup_env.sh: uv could not install the packages; installing them with pip" >&2
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"
