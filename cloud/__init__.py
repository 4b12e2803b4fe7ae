"""The cloud side: packages models, steers the fleet over MQTT, and serves the fallback pool.

Packages, each importing only those below it (import-linter contracts in pyproject.toml):

- ``cli``        the ``autoglm`` command line (it also mounts ``autoglm edge``).
- ``plane``      the control plane: REST API, app, auth, fleet, rollouts, database, metrics.
- ``gateway``    the fallback gateway over the pool replicas.
- ``mqtt``       the cloud's MQTT session, the blob server, broker PKI, a private mosquitto.
- ``pool``       one replica of the cloud GPU pool (continuous batching, PyTorch).
- ``packaging``  Hugging Face or GGUF → ONNX → quantized, measured, signed packages.

Top level: ``registry`` (signed manifests and blobs), ``settings``, ``paths``, ``processes``,
``ratelimit`` (token buckets).
``cloud`` uses the edge only through ``edge_agent.serving`` and ``edge_agent.runtime`` (the pool
and packaging checks run on them), besides the CLI mounting ``autoglm edge``.
"""
