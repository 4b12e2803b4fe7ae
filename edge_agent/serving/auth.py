"""The bearer-key check of the local API and the pool (a key set in their settings)."""

from __future__ import annotations

import hmac

from fastapi import Request

from shared.errors import Unauthorized


def check_bearer(request: Request, key: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <key>`` (nothing to check when None).

    Compared in constant time, so response timing does not reveal how much of a guess was right."""
    if key is None:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {key}".encode()):
        raise Unauthorized("missing or wrong API key")
