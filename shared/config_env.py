"""YAML settings files with environment overrides (edge agent and control plane alike)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from shared.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
# The text of each environment override, by the settings path it set.
EnvTexts = dict[tuple[str, ...], str]


def apply_env(raw: dict[str, Any], env: Mapping[str, str], prefix: str) -> EnvTexts:
    """``PREFIX__BROKER__PORT=1884`` sets ``broker.port``; values are parsed as YAML scalars.
    Returns each override's text as written."""
    texts: EnvTexts = {}
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
            texts[tuple(path)] = value
    return texts


def read_settings_file(
    path: Path, prefix: str, env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], EnvTexts]:
    """The YAML mapping in ``path`` with ``PREFIX__…`` overrides applied, and the overrides'
    texts; ConfigError otherwise."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError("config file not found", path=str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file is not valid YAML: {exc}", path=str(path)) from exc
    if not isinstance(raw, dict):
        raise ConfigError("config file must hold a mapping", path=str(path))
    return raw, apply_env(raw, os.environ if env is None else env, prefix)


def validate_settings(model: type[M], raw: dict[str, Any], texts: EnvTexts) -> M:
    """``model`` from ``raw``. An override that YAML read as a number, a boolean or a date where
    the setting is text (a device id from a node named ``1234`` or ``0755``) is taken as written:
    Kubernetes fills these variables from names it does not quote."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        wrong = [
            loc
            for e in exc.errors()
            if e["type"] == "string_type" and (loc := tuple(map(str, e["loc"]))) in texts
        ]
        if not wrong:
            raise
    for loc in wrong:
        node = raw
        for part in loc[:-1]:
            node = node[part]
        node[loc[-1]] = texts[loc]
    return model.model_validate(raw)


def validation_problems(exc: Any) -> str:
    """A pydantic ValidationError as ``a.b: message; c: message``."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
