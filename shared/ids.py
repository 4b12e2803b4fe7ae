"""Validated identifiers that appear in topics, paths and manifests."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

# No MQTT wildcards, no slashes, no leading dot: safe in topics and file names alike.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
HEX64_PATTERN = r"^[0-9a-f]{64}$"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Digest = Annotated[str, StringConstraints(pattern=DIGEST_PATTERN)]
Hex64 = Annotated[str, StringConstraints(pattern=HEX64_PATTERN)]

_NAME_RE = re.compile(NAME_PATTERN)
_DIGEST_RE = re.compile(DIGEST_PATTERN)


def is_valid_name(value: str) -> bool:
    # fullmatch: with match, "$" also matched before a final newline ("canary\n" passed).
    return bool(_NAME_RE.fullmatch(value))


def is_valid_digest(value: str) -> bool:
    return bool(_DIGEST_RE.fullmatch(value))
