"""The fallback gateway: tenants' OpenAI requests spread over the pool replicas.

- ``balancer``  ``PoolGateway``: model-aware least-loaded choice, health and readiness checks,
  retries, honest ends of broken streams.
- ``load``      what a replica's ``/metrics`` says about its load (vLLM's and our pool's gauges).

Per-tenant rate limits are ``cloud.ratelimit`` (the blob server's byte budgets use it too).
"""
