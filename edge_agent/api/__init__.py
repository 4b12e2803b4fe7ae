"""The device's local HTTP application.

- ``app``     ``create_app``: the lifespan owns the agent, the router and the cloud client.
- ``router``  probes (``/healthz``, ``/readyz``) and the agent routes (``/v1/agent``, ``/metrics``).

The OpenAI routes themselves come from ``edge_agent.serving``.
"""
