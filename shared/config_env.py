"""Environment overrides for YAML settings files (edge agent and control plane alike)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from shared.errors import ConfigError


def apply_env(raw: dict[str, Any], env: Mapping[str, str], prefix: str) -> None:
    """``PREFIX__BROKER__PORT=1884`` sets ``broker.port``; values are parsed as YAML scalars."""
    for key, value in env.items():
        if not key.startswith(prefix):
            continue
        path = [p.lower() for p in key[len(prefix) :].split("__") if p]
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("environment override targets a non-mapping", variable=key)
        if path:
            node[path[-1]] = yaml.safe_load(value)
