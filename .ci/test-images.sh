#!/usr/bin/env bash
# The container images built and run (tests/test_images.py): outside the 20-minute CI, as root.
# Installs Debian's docker.io and debootstrap if missing and starts dockerd without a bridge
# network (containers use --network host), then runs the test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "[images] run as root: dockerd and debootstrap need it" >&2
    exit 1
fi
missing=""
command -v dockerd >/dev/null 2>&1 || missing="$missing docker.io"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
if [ -n "$missing" ]; then
    echo "[images] installing Debian packages:$missing"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    echo "[images] starting dockerd (no bridge, no iptables)"
    nohup dockerd --bridge=none --iptables=false --ip-forward=false >/var/log/autoglm-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "[images] dockerd did not start: /var/log/autoglm-dockerd.log" >&2; exit 1; }
fi
bash .ci/bootstrap.sh
exec .venv/bin/python -m pytest -ra -m images tests/test_images.py "$@"
