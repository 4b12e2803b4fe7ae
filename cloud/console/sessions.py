"""Console sign-ins: an operator or admin API key buys a session whose token lives in an HttpOnly,
SameSite=Strict cookie; every state-changing form carries the session's CSRF token.

Sessions are rows in the database (only a SHA-256 of the token), so every control-plane replica
accepts them and a restart signs nobody out. Each request checks the key behind the session
again: revoking or expiring the key ends its sessions at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, and_, delete, select

from cloud.plane.auth import ApiKeys, Principal
from cloud.plane.store import api_keys, as_utc, console_sessions, utcnow
from shared.errors import Forbidden, Unauthorized

COOKIE = "agc_session"
# Double-submit token of the sign-in form (there is no session yet to hold one).
LOGIN_COOKIE = "agc_login"
# A one-time message for the next page (after a redirect): never taken from the URL, so a link
# cannot make the console say something it did not.
NOTICE_COOKIE = "agc_notice"


def same_secret(a: str | None, b: str | None) -> bool:
    """Constant-time, on bytes: compare_digest refuses str with non-ASCII characters (a forged
    form may send any)."""
    return bool(a) and bool(b) and hmac.compare_digest((a or "").encode(), (b or "").encode())


@dataclass(frozen=True)
class ConsoleSession:
    principal: Principal
    csrf_token: str

    def csrf_ok(self, submitted: str | None) -> bool:
        return same_secret(self.csrf_token, submitted)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ConsoleSessions:
    def __init__(self, engine: Engine, keys: ApiKeys, ttl_s: float) -> None:
        self.engine = engine
        self.keys = keys
        self.ttl = timedelta(seconds=ttl_s)

    def sign_in(self, key: str) -> tuple[str, ConsoleSession]:
        """A new session for ``key``: (cookie token, session). Inference keys are refused: they
        may call models, not steer the fleet."""
        principal = self.keys.verify(key.strip())
        if principal is None:
            raise Unauthorized("unknown, revoked or expired API key")
        if not principal.allows("operator"):
            raise Forbidden(f"the console needs an operator or admin key; this one is {principal.scope!r}")
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(delete(console_sessions).where(console_sessions.c.expires_at < now))
            conn.execute(
                console_sessions.insert().values(
                    session_sha256=_digest(token),
                    tenant=principal.tenant,
                    key_id=principal.key_id,
                    csrf_token=csrf,
                    created_at=now,
                    expires_at=now + self.ttl,
                )
            )
        return token, ConsoleSession(principal, csrf)

    def resolve(self, token: str | None) -> ConsoleSession | None:
        """The live session of a cookie token, or None (unknown, expired, or its key revoked,
        expired or no longer allowed)."""
        if not token:
            return None
        now = utcnow()
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    console_sessions.c.csrf_token,
                    console_sessions.c.expires_at,
                    api_keys.c.key_id,
                    api_keys.c.tenant,
                    api_keys.c.scope,
                    api_keys.c.name,
                    api_keys.c.expires_at.label("key_expires_at"),
                )
                .join(
                    api_keys,
                    and_(
                        api_keys.c.key_id == console_sessions.c.key_id,
                        api_keys.c.tenant == console_sessions.c.tenant,
                    ),
                )
                .where(
                    and_(console_sessions.c.session_sha256 == _digest(token), api_keys.c.revoked.is_(False))
                )
            ).first()
        if row is None:
            return None
        m = row._mapping
        session_end = as_utc(m["expires_at"])
        key_end = as_utc(m["key_expires_at"])
        if (session_end is not None and session_end <= now) or (key_end is not None and key_end <= now):
            return None
        principal = Principal(tenant=m["tenant"], scope=m["scope"], key_id=m["key_id"], name=m["name"])
        if not principal.allows("operator"):
            return None
        return ConsoleSession(principal, m["csrf_token"])

    def sign_out(self, token: str | None) -> None:
        if not token:
            return
        with self.engine.begin() as conn:
            conn.execute(delete(console_sessions).where(console_sessions.c.session_sha256 == _digest(token)))
