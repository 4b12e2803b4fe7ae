"""YAML settings files with environment overrides (edge agent and control plane alike)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
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


def read_settings_file(path: Path, prefix: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The YAML mapping in ``path`` with ``PREFIX__…`` overrides applied; ConfigError otherwise."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError("config file not found", path=str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file is not valid YAML: {exc}", path=str(path)) from exc
    if not isinstance(raw, dict):
        raise ConfigError("config file must hold a mapping", path=str(path))
    apply_env(raw, os.environ if env is None else env, prefix)
    return raw


def validation_problems(exc: Any) -> str:
    """A pydantic ValidationError as ``a.b: message; c: message``."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
