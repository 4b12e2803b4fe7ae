"""YAML settings files with environment overrides (edge agent and control plane alike)."""

from __future__ import annotations

import os
import re
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
    """``PREFIX__BROKER__PORT=1884`` sets ``broker.port`` (values read by ``env_value``).
    Returns each override's text as written."""
    texts: EnvTexts = {}
    # Whole sections before their keys, whatever order the environment lists them in.
    for key, value in sorted(env.items(), key=lambda item: item[0].count("__")):
        if not key.startswith(prefix):
            continue
        path = [p.lower() for p in key[len(prefix) :].split("__") if p]
        if not path:
            continue
        node: Any = raw
        for part in path[:-1]:
            node = _step(node, part, key)
        _put(node, path[-1], env_value(value, key), key)
        texts[tuple(path)] = value
    return texts


_NULL = frozenset({"", "null", "Null", "NULL", "~"})
_INT = re.compile(r"[-+]?[0-9][0-9_]*")
_FLOAT = re.compile(r"[-+]?([0-9][0-9_]*\.[0-9_]*|\.[0-9]+|[0-9][0-9_]*)([eE][-+]?[0-9]+)?")
_SPECIAL_FLOATS = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}
_BOOL = {"true": True, "false": False}


def env_value(text: str, variable: str) -> Any:
    """An override's value, as YAML would read the same scalar except that text stays text:
    a list or mapping (``[a, b]``, ``{k: v}``) or a quoted string is read as YAML; empty,
    ``null`` or ``~`` is None; a number or ``true``/``false`` is one; anything else is the text,
    without surrounding whitespace (a Secret's trailing newline). Reading every value as YAML
    took ``#secret`` for a comment (an API key of None: the API open), cut ``abc #def`` to
    ``abc`` and read ``0755`` as an octal number."""
    stripped = text.strip()
    if stripped.startswith(("[", "{", "'", '"')):
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment override is not valid YAML: {exc}", variable=variable) from exc
    if stripped in _NULL:
        return None
    if _INT.fullmatch(stripped):
        return int(stripped)
    if _FLOAT.fullmatch(stripped):
        return float(stripped)
    if stripped.lower() in _SPECIAL_FLOATS:
        return float(_SPECIAL_FLOATS[stripped.lower()])
    if stripped.lower() in _BOOL:
        return _BOOL[stripped.lower()]
    return stripped


def _step(node: Any, part: str, variable: str) -> Any:
    """One level down: a mapping's key (made when missing) or a list's item by its number
    (``GATEWAY__UPSTREAMS__0__API_KEY``: a Secret fills one upstream's key)."""
    if isinstance(node, list):
        return node[_index(node, part, variable)]
    if not isinstance(node, dict):
        raise ConfigError("environment override targets a non-mapping", variable=variable)
    return node.setdefault(part, {})


def _put(node: Any, part: str, value: Any, variable: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, variable)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError("environment override targets a non-mapping", variable=variable)


def _index(items: list[Any], part: str, variable: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"environment override names item {part!r} of a list of {len(items)} (items count from 0)",
            variable=variable,
        )
    return int(part)


def read_settings_file(
    path: Path, prefix: str, env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], EnvTexts]:
    """The YAML mapping in ``path`` with ``PREFIX__…`` overrides applied, and the overrides'
    texts; ConfigError otherwise."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError("config file not found", path=str(path)) from exc
    except OSError as exc:  # a directory, no permission
        raise ConfigError(f"config file cannot be read: {exc.strerror}", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file is not UTF-8 text: {exc.reason} at byte {exc.start}", path=str(path)
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file is not valid YAML: {exc}", path=str(path)) from exc
    if not isinstance(raw, dict):
        raise ConfigError("config file must hold a mapping", path=str(path))
    return raw, apply_env(raw, os.environ if env is None else env, prefix)


def validate_settings(model: type[M], raw: dict[str, Any], texts: EnvTexts) -> M:
    """``model`` from ``raw``. An override read as a number or a boolean where the setting is
    text (a device id from a node named ``1234`` or ``0755``) is taken as written: Kubernetes
    fills these variables from names it does not quote."""
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
        node: Any = raw
        variable = "__".join(loc)
        for part in loc[:-1]:
            node = _step(node, part, variable)
        _put(node, loc[-1], texts[loc].strip(), variable)
    return model.model_validate(raw)


def validation_problems(exc: Any) -> str:
    """A pydantic ValidationError as ``a.b: message; c: message``."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
