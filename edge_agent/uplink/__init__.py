"""Everything between the device and the broker.

- ``link``       the persistent MQTT session: desired states, commands, chunks, acks in; reports out.
- ``outbox``     the durable SQLite outbox; an entry leaves only when the cloud acknowledges it.
- ``telemetry``  per-request records into the outbox, and the sender that drains it.
"""
