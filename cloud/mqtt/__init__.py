"""The cloud's side of MQTT.

- ``control_link``  one session per replica: device reports, presence and fetches in (shared
  subscriptions), desired states, commands and acknowledgements out.
- ``blob_server``   answers fetch requests with chunk publishes, coalescing devices that want
  the same chunk.
- ``pki``           the fleet CA, client certificates, and the broker's TLS and ACL lines.
- ``local_broker``  a private mosquitto from a generated config (demo, tests, benchmarks).
"""
