"""Model updates as a persisted state machine that survives a crash at any step.

- ``reconciler``  drives the device from its persisted state toward the desired state.
- ``state``       that state, written atomically before every step.
- ``fetcher``     chunks over MQTT into a partial file, each verified; resume and local reuse.
- ``slots``       A/B slots: a model is staged beside the live one, then switched to.
"""
