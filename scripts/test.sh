#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite in two pytest-xdist workers (the CI machine has two
# cores, and compiling, most of the suite's time, uses one). Extra arguments go to pytest (`-n 0`: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup "$@"
