"""The shared record of one provider credential: its limiter, its breaker and who holds its
slots. Pure: building, changing, encoding and decoding it; the NATS KV bucket that stores it
(updated only by compare-and-set) is an adapter's business.

Identity: a credential is the hash of (dialect, base URL, API key), never the key itself, so a
restart with another key is another credential, with a closed breaker. Its record is kept per
model (Zhipu sets its limits per model), keyed ``<credential>.<model>``.

Slots: each worker keeps a *holding*: ``held`` slots it may use (its calls in flight never
exceed it), what it ``want``\\ s (calls in flight + waiting) and when it was last ``seen``. A
worker raises its holding only by compare-and-set, so that the holdings never add up to more
than the limit when raised; it lowers it to its fair share of the limit when others are short
or the limit fell. A worker that stops writing (crashed) is dropped after the lease, and its
slots go back to the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from charai.core.domain import breaker as brk
from charai.core.domain import provider_limit as lim
from charai.core.domain.breaker import Breaker, BreakerState
from charai.core.domain.provider_limit import Limiter

#: Bumped when the record's meaning changes; older records are read with defaults.
VERSION = 1
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def credential_id(dialect: str, base_url: str, api_key: str) -> str:
    """A short, stable id of a credential: 16 hex digits of SHA-256 over dialect, normalized
    base URL and key. It names the credential in records, metrics and logs without revealing
    the key (64 bits of a hash of a high-entropy key)."""
    material = "\x00".join((dialect.strip().lower(), base_url.strip().rstrip("/"), api_key))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]


def record_key(credential: str, model: str) -> str:
    """The KV key of a credential's record for ``model`` (KV keys allow few characters: a model
    name with others is replaced by a hash of it)."""
    token = (
        model if model and not _KEY_SAFE.search(model) else hashlib.sha256(model.encode()).hexdigest()[:12]
    )
    return f"{credential}.{token}"


@dataclasses.dataclass(frozen=True, slots=True)
class Holder:
    """One worker's holding (see the module docstring); ``in_flight`` as of its last write."""

    held: int = 0
    want: int = 0
    in_flight: int = 0
    seen: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderRecord:
    """Everything shared about one credential and model."""

    credential: str
    kind: str
    dialect: str
    model: str
    limiter: Limiter = dataclasses.field(default_factory=Limiter)
    breaker: Breaker = brk.CLOSED
    holders: Mapping[str, Holder] = dataclasses.field(default_factory=dict)
    updated: float = 0.0

    @property
    def key(self) -> str:
        return record_key(self.credential, self.model)

    @property
    def in_flight(self) -> int:
        """Calls in flight cluster-wide, as the holders last wrote them."""
        return sum(h.in_flight for h in self.holders.values())

    @property
    def held(self) -> int:
        return sum(h.held for h in self.holders.values())

    def live(self, now: float, lease: float) -> ProviderRecord:
        """The record without the holders not seen for ``lease`` seconds (crashed workers)."""
        holders = {k: h for k, h in self.holders.items() if now - h.seen <= lease}
        return self if len(holders) == len(self.holders) else dataclasses.replace(self, holders=holders)

    def with_limiter(self, limiter: Limiter) -> ProviderRecord:
        return self if limiter == self.limiter else dataclasses.replace(self, limiter=limiter)

    def with_breaker(self, breaker: Breaker) -> ProviderRecord:
        return self if breaker == self.breaker else dataclasses.replace(self, breaker=breaker)

    def without(self, holder: str) -> ProviderRecord:
        holders = {k: h for k, h in self.holders.items() if k != holder}
        return dataclasses.replace(self, holders=holders)


def others_in_flight(record: ProviderRecord, me: str) -> int:
    """What the other workers may have in flight: their holdings (a holding bounds its calls,
    and is exact while they are busy, the only time a 429 comes)."""
    return sum(max(h.held, h.in_flight) for k, h in record.holders.items() if k != me)


def shares(record: ProviderRecord, me: str, want: int, now: float) -> dict[str, int]:
    """Every holder's fair share of the current cap, with ``me`` wanting ``want``."""
    cap = lim.cap(record.limiter)
    wants = {k: h.want for k, h in record.holders.items()}
    wants[me] = want
    if cap is None:
        return wants
    return lim.fair_shares(cap, wants, lim.rotation(now))


def usable(record: ProviderRecord, me: str, want: int, now: float) -> int | None:
    """Calls ``me`` may have in flight now (``None``: no limit).

    Its holding; no more than the cap leaves beside the other workers' holdings (after the
    limit fell, a worker still holding more than its new share drains its calls first: the
    others wait for that rather than fire calls the provider would refuse); and no more than its
    fair share while others are short or the holdings exceed the cap (it yields at once, before
    it has written its smaller holding).
    """
    cap = lim.cap(record.limiter)
    if cap is None:
        return None
    mine = record.holders.get(me, Holder())
    others = record.holders.items()
    room = cap - others_in_flight(record, me)
    others_short = any(h.want > h.held for k, h in others if k != me)
    if record.held <= cap and not others_short:
        return max(0, min(mine.held, room))
    return max(0, min(mine.held, room, shares(record, me, want, now)[me]))


def allot(
    record: ProviderRecord, me: str, *, in_flight: int, want: int, now: float, keep_idle: bool = True
) -> ProviderRecord:
    """The record with ``me``'s holding as it should be now.

    Raising takes only free slots (the holdings stay within the cap); lowering goes to the fair
    share, never below the calls ``me`` has in flight. Idle slots (held beyond what ``me``
    wants) are kept, with ``keep_idle``, while nobody else is short and the cap is not exceeded:
    giving them back costs a write per call when the load is light.
    """
    cap = lim.cap(record.limiter)
    current = record.holders.get(me, Holder())
    if cap is None:
        held = max(in_flight, want)
    else:
        others = {k: h for k, h in record.holders.items() if k != me}
        free = cap - sum(h.held for h in others.values())
        target = min(want, shares(record, me, want, now)[me])
        held = min(target, max(current.held, free))
        others_short = any(h.want > h.held for h in others.values())
        if keep_idle and held < current.held <= free and not others_short:
            held = current.held
        held = max(held, in_flight)
    holding = Holder(held=held, want=want, in_flight=in_flight, seen=now)
    return dataclasses.replace(record, holders={**record.holders, me: holding}, updated=now)


def encode(record: ProviderRecord) -> bytes:
    """The record as compact JSON (what the KV bucket stores)."""
    body: dict[str, Any] = {
        "v": VERSION,
        "credential": record.credential,
        "kind": record.kind,
        "dialect": record.dialect,
        "model": record.model,
        "limiter": dataclasses.asdict(record.limiter),
        "breaker": {**dataclasses.asdict(record.breaker), "state": record.breaker.state.value},
        "holders": {k: dataclasses.astuple(h) for k, h in record.holders.items()},
        "updated": record.updated,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> ProviderRecord:
    """Reads :func:`encode`'s JSON; unknown fields are ignored and missing ones take defaults,
    so workers of two versions can share a record during a rolling upgrade.

    Raises:
        ValueError: not a record.
    """
    try:
        body = json.loads(data)
        limiter = _known(Limiter, body.get("limiter") or {})
        breaker_fields = _known(Breaker, body.get("breaker") or {})
        breaker_fields["state"] = BreakerState(breaker_fields.get("state", "closed"))
        holders = {str(k): Holder(*v[:4]) for k, v in (body.get("holders") or {}).items()}
        return ProviderRecord(
            credential=str(body["credential"]),
            kind=str(body.get("kind", "")),
            dialect=str(body.get("dialect", "")),
            model=str(body.get("model", "")),
            limiter=Limiter(**limiter),
            breaker=Breaker(**breaker_fields),
            holders=holders,
            updated=float(body.get("updated", 0.0)),
        )
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a provider record: {exc}") from None


def _known(cls: type, fields: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in fields.items() if k in names}
