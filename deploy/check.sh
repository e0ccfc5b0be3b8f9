#!/usr/bin/env bash
# Every check, the same one CI runs: format, lint, types, import contracts, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
.venv/bin/ruff format --check serving models loadtests tests
.venv/bin/ruff check serving models loadtests tests
.venv/bin/mypy serving
.venv/bin/lint-imports --no-cache  # the layers and contracts in pyproject.toml [tool.importlinter]
if [ $# -gt 0 ]; then
  .venv/bin/python -m pytest "$@"
else
  # The multi-node tier starts Ray clusters of its own (tests/multinode): a session of its own, so
  # the rest's live deployment is gone by then instead of sharing the two cores with it. The
  # PostgreSQL tier (the ledger's tests on a server that session starts) is a session of its own too.
  .venv/bin/python -m pytest -m "not multinode and not postgres"
  .venv/bin/python -m pytest -m postgres
  .venv/bin/python -m pytest -m multinode
fi
