#!/usr/bin/env bash
# The test suite: set up, lint, type-check, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/bootstrap.sh
echo "[test] ruff (${SECONDS}s since the start)"
.venv/bin/ruff check shared cloud edge_agent tests bench docs
.venv/bin/ruff format --check shared cloud edge_agent tests bench docs
echo "[test] import contracts, pyproject.toml [tool.importlinter] (${SECONDS}s)"
.venv/bin/lint-imports --no-cache
echo "[test] mypy (${SECONDS}s)"
.venv/bin/mypy shared cloud edge_agent
echo "[test] pytest (${SECONDS}s)"
exec .venv/bin/python -m pytest -ra --durations=15 "$@"
