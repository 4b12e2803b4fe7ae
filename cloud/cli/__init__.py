"""The ``autoglm`` command line: one tool for operators, packagers and devices.

- ``root``     the root app: ``model``, ``cloud`` (serve, assign, keys), ``edge``, ``pool``, ``demo``.
- ``ops``      fleet and rollout commands against a running control plane, broker config.
- ``demo``     ``autoglm demo``: a broker, a control plane and an agent on this machine.
- ``console``  how commands show progress to a person.
"""

from cloud.cli.root import app, main

__all__ = ["app", "main"]
