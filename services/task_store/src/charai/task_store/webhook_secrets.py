"""Webhook signing secrets: derived, never stored.

A tenant's ``whsec_`` secret is HMAC-SHA256 of the signing key (``CHARAI_WEBHOOK_SIGNING_KEY``,
or the data dir's generated key) over the tenant and a version; the database holds only the
version and until when the previous one still signs (``RotateWebhookSecret``'s grace).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from charai.core.clock import Clock
from charai.task_store.backend import Backend, Tx
from charai.tasks.v1 import task_service_pb2


def derive_secret(signing_key: bytes, tenant: str, version: int) -> str:
    """A tenant's ``whsec_`` secret of one version."""
    raw = hmac.new(signing_key, f"charai-webhook\x00{tenant}\x00{version}".encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(raw).decode()


class WebhookSecrets:
    """Each tenant's secret version, and the secrets it stands for."""

    def __init__(self, backend: Backend, clock: Clock, key: bytes, grace_seconds: float) -> None:
        self._db = backend
        self._clock = clock
        self._key = key
        self._grace_seconds = grace_seconds

    async def _version(self, tx: Tx, tenant: str) -> tuple[int, int]:
        row = await tx.fetchrow(
            "SELECT version, previous_until FROM webhook_secrets WHERE tenant = ?", tenant
        )
        return (1, 0) if row is None else (int(row[0]), int(row[1]))

    async def signing(self, tx: Tx, tenant: str, now: int) -> list[str]:
        """The secrets that sign a delivery now, newest first (two during a rotation's grace)."""
        version, previous_until = await self._version(tx, tenant)
        key = self._key
        out = [derive_secret(key, tenant, version)]
        if version > 1 and previous_until > now:
            out.append(derive_secret(key, tenant, version - 1))
        return out

    async def current(self, tenant: str) -> str:
        """The tenant's current secret (what GetWebhookSecret answers)."""

        async def body(tx: Tx) -> str:
            version, _ = await self._version(tx, tenant)
            return derive_secret(self._key, tenant, version)

        return await self._db.read(body)

    async def rotate(self, tenant: str) -> task_service_pb2.RotateWebhookSecretResponse:
        """A new version; the previous one keeps signing for the grace period."""

        async def body(tx: Tx) -> task_service_pb2.RotateWebhookSecretResponse:
            now = self._clock.now_us()
            version, _ = await self._version(tx, tenant)
            until = now + int(self._grace_seconds * 1e6)
            await tx.execute(
                "INSERT INTO webhook_secrets (tenant, version, previous_until) VALUES (?, ?, ?)"
                " ON CONFLICT (tenant) DO UPDATE SET version = excluded.version,"
                " previous_until = excluded.previous_until",
                tenant,
                version + 1,
                until,
            )
            out = task_service_pb2.RotateWebhookSecretResponse(
                secret=derive_secret(self._key, tenant, version + 1)
            )
            out.previous_expire_time.FromMicroseconds(until)
            return out

        return await self._db.write(body)
