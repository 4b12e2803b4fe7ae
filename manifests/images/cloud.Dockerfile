# The control plane and fallback gateway: `autoglm cloud serve` (no torch: the `control` extra).
# Build from the repository root:  docker build -f manifests/images/cloud.Dockerfile -t autoglm/cloud:0.1.0 .
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
RUN pip install -c /opt/autoglm/constraints.txt ".[control]" \
    && useradd --uid 10001 --home-dir /var/lib/autoglm --create-home --shell /usr/sbin/nologin autoglm

USER 10001
WORKDIR /var/lib/autoglm
EXPOSE 8400
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8400/healthz', timeout=2)"]
ENTRYPOINT ["autoglm"]
CMD ["cloud", "serve", "--config", "/etc/autoglm/cloud.yaml"]
