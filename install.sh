#!/usr/bin/env bash
# Install cxrlab into ./.venv from scratch. `./install.sh test` adds the test dependencies and the cluster extra
# (Ray), so that the --ray tests run; `./install.sh cluster` adds only the cluster extra.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel first: an unpinned torch requirement would otherwise pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q -e ".[test,cluster]"
elif [ "${1:-}" = "cluster" ]; then
  .venv/bin/python -m pip install -q -e ".[cluster]"
else
  .venv/bin/python -m pip install -q -e .
fi
