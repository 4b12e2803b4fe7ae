"""API keys: per tenant, with a scope. Only a SHA-256 of the secret is stored; the key is shown once.

Scopes are ordered: ``admin`` ⊃ ``operator`` ⊃ ``inference``. Operators run the fleet (devices,
rollouts, config, model listing); admins also delete models and manage keys; inference keys
only call the model endpoints (the fallback gateway).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Engine, and_, select, update

from cloud.store import api_keys, utcnow
from shared.errors import ContractError
from shared.ids import is_valid_name

Scope = Literal["admin", "operator", "inference"]
SCOPES: tuple[Scope, ...] = ("inference", "operator", "admin")
KEY_PREFIX = "agk"


@dataclass(frozen=True)
class Principal:
    tenant: str
    scope: Scope
    key_id: str
    name: str

    def allows(self, needed: Scope) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeys:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, tenant: str, name: str, scope: Scope) -> tuple[str, str]:
        """Returns (key_id, the full key). The key cannot be recovered later."""
        if not is_valid_name(tenant):
            raise ContractError("invalid tenant name", tenant=tenant)
        if scope not in SCOPES:
            raise ContractError(f"scope must be one of {', '.join(SCOPES)}", scope=scope)
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
                )
            )
        return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"

    def verify(self, key: str) -> Principal | None:
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX:
            return None
        _, key_id, secret = parts
        with self.engine.connect() as conn:
            row = conn.execute(
                select(api_keys).where(and_(api_keys.c.key_id == key_id, api_keys.c.revoked.is_(False)))
            ).first()
        if row is None or not hmac.compare_digest(row._mapping["secret_sha256"], _digest(secret)):
            return None
        m = row._mapping
        return Principal(tenant=m["tenant"], scope=m["scope"], key_id=key_id, name=m["name"])

    def list(self, tenant: str) -> list[dict[str, object]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(api_keys).where(api_keys.c.tenant == tenant).order_by(api_keys.c.created_at)
            ).all()
        return [
            {
                "key_id": r._mapping["key_id"],
                "name": r._mapping["name"],
                "scope": r._mapping["scope"],
                "revoked": r._mapping["revoked"],
            }
            for r in rows
        ]

    def revoke(self, tenant: str, key_id: str) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(
                update(api_keys)
                .where(and_(api_keys.c.tenant == tenant, api_keys.c.key_id == key_id))
                .values(revoked=True)
            )
        return bool(result.rowcount)
