"""The edge agent: serves a model locally behind an OpenAI-compatible API, keeps it up to date
from the cloud, and falls back to the cloud pool when it cannot serve a request itself.

Packages, each importing only those below it (import-linter contracts in pyproject.toml):

- ``api``      the local HTTP application: probes, agent routes, the lifespan wiring it all.
- ``batch``    OpenAI's Batch API: a durable journal of requests run in the background, locally
  when the device is idle, in the cloud when it answers.
- ``routing``  where a request is served: the policy router, the cloud client, its circuit breaker.
- ``update``   the persisted update state machine: reconciler, chunk fetcher, A/B slots.
- ``uplink``   MQTT to the cloud: the link, the durable outbox, telemetry.
- ``serving``  the OpenAI endpoints' logic, errors, streaming and server. Public: the cloud pool
  runs on it.
- ``runtime``  ONNX Runtime generation, tokenizer text, chat templates, the model host. Public:
  packaging and the pool run on it.

Top level: ``agent`` (the device's long-lived parts), ``settings`` (edge.yaml), ``metrics``,
``cli`` (``autoglm edge``). ``serving`` and ``runtime`` never import the rest of the agent.
"""
