"""The fallback gateway: tenants' OpenAI requests spread over the pool replicas.

- ``balancer``  ``PoolGateway``: model-aware least-outstanding choice, health checks, retries,
  honest ends of broken streams.

Per-tenant rate limits are ``cloud.ratelimit`` (the blob server's byte budgets use it too).
"""
