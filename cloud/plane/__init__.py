"""The control plane: one process per replica, any number of replicas over one database.

- ``app``       ``create_app``: the lifespan owns the ``ControlPlane``.
- ``service``   ``ControlPlane``: the MQTT session, device reports to ``ingest``, publishing of
  desired states, the rollout driver's loop, commands.
- ``api``       the REST routes (``/v1``) and the OpenAI gateway routes, per tenant.
- ``auth``      API keys with scopes and lifetimes.
- ``fleet``     devices, labels, desired states (the revision counter), telemetry.
- ``ingest``    device messages stored on one thread, many per transaction, then acknowledged.
- ``rollouts``  staged rollouts: spec, waves, health gates, the leased driver.
- ``store``     the tables and migrations (SQLite or PostgreSQL).
- ``metrics``   Prometheus metrics read from live state.
"""
