# The edge agent for CPU devices: onnxruntime + numpy + tokenizers, no torch (the `edge` extra).
# Build from the repository root:  docker build -f manifests/images/edge.Dockerfile -t autoglm/edge:0.1.0 .
# BASE: any image with Python 3.11+ and pip on PATH (tests/test_images.py builds one from Debian).
ARG BASE=python:3.11.11-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/autoglm/src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY cloud ./cloud
COPY edge_agent ./edge_agent
COPY manifests/images/constraints.txt /opt/autoglm/constraints.txt
RUN pip install -c /opt/autoglm/constraints.txt ".[edge]" \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && useradd --uid 10001 --home-dir /var/lib/autoglm --create-home --shell /usr/sbin/nologin autoglm

USER 10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["autoglm"]
CMD ["edge", "run", "--config", "/etc/autoglm/edge.yaml"]
