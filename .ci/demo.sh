#!/usr/bin/env bash
# The main job: set up, then `autoglm demo` (train + package the demo model, ship it over MQTT
# to an edge agent, and ask that agent for a completion). Extra arguments go to `autoglm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/bootstrap.sh
exec .venv/bin/autoglm demo "$@"
