"""API keys: per tenant, with a scope. Only a SHA-256 of the secret is stored; the key is shown once.

Scopes are ordered: ``admin`` ⊃ ``operator`` ⊃ ``inference``. Operators run the fleet (devices,
rollouts, config, model listing); admins also delete models and manage keys; inference keys
only call the model endpoints (the fallback gateway). Apart from the order, ``pool`` keys only
read the registry's pool artifacts (what a pool replica fetches its model with: a key that
leaks from a GPU pod gives no hold on the fleet); operators and admins may read them too.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Engine, and_, select, update

from cloud.plane.store import api_keys, as_utc, utcnow
from shared.errors import ContractError, Forbidden, Unauthorized
from shared.ids import is_valid_name

Scope = Literal["admin", "operator", "inference", "pool"]
# The ordered scopes; "pool" stands beside them.
ORDERED: tuple[Scope, ...] = ("inference", "operator", "admin")
SCOPES: tuple[Scope, ...] = (*ORDERED, "pool")
KEY_PREFIX = "agk"
# Longest a key may be made to live (ten years); keys without an expiry never expire.
MAX_KEY_LIFETIME_S = 10 * 365 * 86400
MIN_KEY_LIFETIME_S = 1
# Compared against when a key id is unknown, so a miss costs the same as a wrong secret.
_NO_SECRET = hashlib.sha256(b"no such key").hexdigest()
# A key id as create() makes it (secrets.token_hex(6)).
_KEY_ID = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True)
class Principal:
    tenant: str
    scope: Scope
    key_id: str
    name: str

    def allows(self, needed: Scope) -> bool:
        if needed == "pool":
            return self.scope in ("pool", "operator", "admin")
        if self.scope == "pool":
            return False
        return ORDERED.index(self.scope) >= ORDERED.index(needed)

    def require(self, needed: Scope) -> None:
        """Forbidden unless this key's scope allows ``needed``."""
        if not self.allows(needed):
            raise Forbidden(f"this needs a key with scope {needed!r}; yours is {self.scope!r}")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# How long a verified key is trusted without asking the database again: revoking a key (or its
# expiry) takes effect within this long on every replica, at once on the replica that revoked it.
VERIFY_TTL_S = 2.0
# Answers remembered at most (unknown keys included, so a flood of made-up keys cannot grow it).
VERIFY_CACHE_SIZE = 10_000


class ApiKeys:
    def __init__(self, engine: Engine, verify_ttl_s: float = VERIFY_TTL_S) -> None:
        self.engine = engine
        self.verify_ttl_s = verify_ttl_s
        # sha256(key) -> (answer, monotonic time it stops being trusted); insertion-ordered.
        # Read on the event loop without the lock (one dict lookup), written under it from threads.
        self._verified: dict[str, tuple[Principal | None, float]] = {}
        self._lock = threading.Lock()
        # Revocations so far: an answer read before one is not remembered after it.
        self._revocations = 0

    def cached(self, key: str) -> tuple[bool, Principal | None]:
        """(found, principal) from the answers of the last ``verify_ttl_s`` seconds, without the
        database: the gateway's per-request check costs a dict lookup."""
        hit = self._verified.get(_digest(key))
        if hit is None or hit[1] <= time.monotonic():
            return False, None
        return True, hit[0]

    async def authenticate(self, authorization: str) -> Principal:
        """The caller of an ``Authorization: Bearer <key>`` header, checked on the event loop: a
        remembered answer costs a dict lookup, a new key one database read in a worker thread.
        Raises Unauthorized."""
        key = authorization[7:] if authorization[:7].lower() == "bearer " else ""
        principal = None
        if key:
            found, principal = self.cached(key)
            if not found:
                principal = await asyncio.to_thread(self.verify_and_remember, key)
        if principal is None:
            raise Unauthorized("missing or unknown API key")
        return principal

    def verify_and_remember(self, key: str) -> Principal | None:
        """``verify``, and remember the answer for ``verify_ttl_s``."""
        with self._lock:
            generation = self._revocations
        principal = self.verify(key)
        with self._lock:
            if generation != self._revocations:
                return principal  # a key was revoked meanwhile: this answer may predate it
            if len(self._verified) >= VERIFY_CACHE_SIZE:
                self._verified.pop(next(iter(self._verified)))
            self._verified[_digest(key)] = (principal, time.monotonic() + self.verify_ttl_s)
        return principal

    def create(
        self, tenant: str, name: str, scope: Scope, *, expires_in_s: float | None = None
    ) -> tuple[str, str]:
        """Returns (key_id, the full key). The key cannot be recovered later."""
        if not is_valid_name(tenant):
            raise ContractError("invalid tenant name", tenant=tenant)
        if scope not in SCOPES:
            raise ContractError(f"scope must be one of {', '.join(SCOPES)}", scope=scope)
        if not 0 < len(name) <= 200:
            raise ContractError("a key's name is 1 to 200 characters", name=name[:40])
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            # Listings, logs and the console show it: a newline forges a line.
            raise ContractError("a key's name has no control characters", name=name[:40])
        expires_at: datetime | None = None
        if expires_in_s is not None:
            # At least a second: a shorter lifetime made a key that was expired as it was made.
            if not MIN_KEY_LIFETIME_S <= expires_in_s <= MAX_KEY_LIFETIME_S:
                raise ContractError(
                    f"expires_in_s is in [{MIN_KEY_LIFETIME_S}, {MAX_KEY_LIFETIME_S}] seconds",
                    expires_in_s=expires_in_s,
                )
            expires_at = utcnow() + timedelta(seconds=expires_in_s)
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(24)
        with self.engine.begin() as conn:
            conn.execute(
                api_keys.insert().values(
                    key_id=key_id,
                    tenant=tenant,
                    name=name,
                    scope=scope,
                    secret_sha256=_digest(secret),
                    created_at=utcnow(),
                    revoked=False,
                    expires_at=expires_at,
                )
            )
        return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"

    def verify(self, key: str) -> Principal | None:
        """The key's principal, or None for a malformed, unknown, wrong, revoked or expired key."""
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX:
            return None
        _, key_id, secret = parts
        if not _KEY_ID.fullmatch(key_id):
            # Not one we make; and PostgreSQL refuses a NUL in a query's text (a 500 at sign-in).
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                select(api_keys).where(and_(api_keys.c.key_id == key_id, api_keys.c.revoked.is_(False)))
            ).first()
        stored = row._mapping["secret_sha256"] if row is not None else _NO_SECRET
        if not hmac.compare_digest(stored, _digest(secret)) or row is None:
            return None
        m = row._mapping
        expires_at = as_utc(m["expires_at"])
        if expires_at is not None and expires_at <= utcnow():
            return None
        return Principal(tenant=m["tenant"], scope=m["scope"], key_id=key_id, name=m["name"])

    def list(self, tenant: str) -> list[dict[str, object]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(api_keys).where(api_keys.c.tenant == tenant).order_by(api_keys.c.created_at)
            ).all()
        now = utcnow()
        out: list[dict[str, object]] = []
        for r in rows:
            m = r._mapping
            expires_at = as_utc(m["expires_at"])
            created_at = as_utc(m["created_at"])
            out.append(
                {
                    "key_id": m["key_id"],
                    "name": m["name"],
                    "scope": m["scope"],
                    "created_at": created_at.isoformat() if created_at else None,
                    "expires_at": expires_at.isoformat() if expires_at else None,
                    "revoked": m["revoked"],
                    "expired": expires_at is not None and expires_at <= now,
                }
            )
        return out

    def revoke(self, tenant: str, key_id: str) -> bool:
        if not _KEY_ID.fullmatch(key_id):
            return False
        with self.engine.begin() as conn:
            result = conn.execute(
                update(api_keys)
                .where(and_(api_keys.c.tenant == tenant, api_keys.c.key_id == key_id))
                .values(revoked=True)
            )
        # This replica forgets every remembered answer now, after the commit, and a check that
        # read the key before it is not remembered (verify_and_remember); the others within
        # verify_ttl_s.
        with self._lock:
            self._verified.clear()
            self._revocations += 1
        return bool(result.rowcount)
