# A pool replica: `autoglm pool serve` on a GPU node (PyTorch with CUDA, bf16).
# Build from the repository root:  docker build -f manifests/images/pool.Dockerfile -t autoglm/pool:0.1.0 .
# The host needs the NVIDIA driver and container toolkit; torch brings its own CUDA libraries.
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
# Where pip looks first for wheels (a URL or folder), e.g. the CPU build of torch for a CPU pool:
# `--build-arg PIP_FIND_LINKS=http://host:port/` (tests/test_images.py serves one).
ARG PIP_FIND_LINKS
RUN pip install "torch==2.13.0" \
    && pip install -c /opt/autoglm/constraints.txt ".[cloud]" \
    && useradd --uid 10001 --home-dir /var/lib/autoglm --create-home --shell /usr/sbin/nologin autoglm

USER 10001
WORKDIR /var/lib/autoglm
EXPOSE 8500
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8500/healthz', timeout=2)"]
ENTRYPOINT ["autoglm"]
# The model folder is mounted at /models/current (a PVC or an init container fills it).
CMD ["pool", "serve", "--model", "/models/current", "--host", "0.0.0.0", "--port", "8500", "--device", "cuda"]
