# The edge agent for CPU devices: onnxruntime + numpy + tokenizers, no torch (the `edge` extra).
# Build from the repository root:  docker build -f manifests/images/edge.Dockerfile -t autoglm/edge:0.1.0 .
# BASE: any image with Python 3.11+ and pip on PATH (tests/test_images.py builds one from Debian).
#
# Two stages: the first compiles the edge's kernels (edge_agent/runtime/kernels: MatMulNBits and
# GroupQueryAttention, a C extension) into the package's wheel, the second installs that wheel
# and carries no compiler.
ARG BASE=python:3.11.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# gcc, and Python's headers where the base has none (Debian's own python3; python:*-slim has them).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && (python -c "import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
        || apt-get install -y --no-install-recommends python3-dev) \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY cloud ./cloud
COPY edge_agent ./edge_agent
# The kernels are an optional extension (an install without a compiler goes on without them);
# here a wheel without them is a failed build, not a quietly slower image.
RUN pip wheel --no-deps -w /wheels . \
    && python -c "import glob, sys, zipfile; names = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]).namelist(); sys.exit(not any('runtime/kernels/_kernels' in n for n in names))"

FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/autoglm
COPY --from=build /wheels /opt/autoglm/wheels
COPY manifests/images/constraints.txt /opt/autoglm/constraints.txt
RUN pip install -c /opt/autoglm/constraints.txt "$(ls /opt/autoglm/wheels/*.whl)[edge]" \
    && rm -rf /opt/autoglm/wheels \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && python -c "import sys; from edge_agent.runtime.kernels import built; sys.exit(built() is None)" \
    && useradd --uid 10001 --home-dir /var/lib/autoglm --create-home --shell /usr/sbin/nologin autoglm

USER 10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["autoglm"]
CMD ["edge", "run", "--config", "/etc/autoglm/edge.yaml"]
