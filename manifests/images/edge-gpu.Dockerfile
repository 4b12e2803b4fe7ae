# The edge agent for GPU devices: onnxruntime-gpu (CUDA execution provider, CPU fallback), no torch.
# Build from the repository root:  docker build -f manifests/images/edge-gpu.Dockerfile -t autoglm/edge-gpu:0.1.0 .
# BASE and PYTHON: a CUDA runtime image and the Python its package manager installs
# (tests/test_images.py builds on a Debian base with python3).
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG PYTHON=python3.12

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/autoglm/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends ${PYTHON} ${PYTHON}-venv \
    && rm -rf /var/lib/apt/lists/* \
    && ${PYTHON} -m venv /opt/autoglm/venv
WORKDIR /opt/autoglm/src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY cloud ./cloud
COPY edge_agent ./edge_agent
COPY manifests/images/constraints.txt /opt/autoglm/constraints.txt
RUN pip install -c /opt/autoglm/constraints.txt ".[gpu]" \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && useradd --uid 10001 --home-dir /var/lib/autoglm --create-home --shell /usr/sbin/nologin autoglm

USER 10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["autoglm"]
CMD ["edge", "run", "--config", "/etc/autoglm/edge.yaml"]
