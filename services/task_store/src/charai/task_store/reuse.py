"""Identical requests reused: the reuse key of a new task, the twin a claim finds, and which media a
deleted task may take with it (README, "Identical requests are reused").

**The key.** At create, a task that opted in (TTS unless ``reuse: false``; an image only with a
``seed``) gets a reuse key: a SHA-256 over its tenant, type, the provider dialect and model of
its type (settings), and the payload fields that shape the output. Fields that only label the
task (character, view, callback) are left out: the same line for two characters is the same
audio. No key when reuse is off (``ttl_seconds`` 0).

**At claim, not at create.** A claim that would start an attempt looks for a *twin*: another task
of the tenant with the same key, COMPLETED within the TTL (the newest such; the TTL runs from its
completion) or RUNNING under a live lease. The lifecycle core decides what that means
(:func:`charai.core.domain.lifecycle.claim`): a completed twin's result is copied onto the task,
which completes in the claim's own transaction (marked ``reused``; the worker acks without a
provider call); a running twin is waited for. Deciding at claim keeps create (and the fair
dispatch behind it) unaware of reuse, and lets a task queued behind a running twin pick up its
result once it exists.

**Races between replicas** (PostgreSQL). Each claim and each detach takes a transaction lock on
its key (after its own row lock; no transaction takes a second row lock while holding a key lock,
so this cannot deadlock): two identical tasks claimed at once do not both see the other still
queued and both call the provider; a claim copying a twin's result commits before, or sees the
twin detached after, the delete that would remove the media. SQLite's single writer gives both
for free.

**Shared media.** A reused result points to the same media object as its twin's. Deleting a task
(DeleteTask, retention) first *detaches* it — its key is marked, so no later claim copies its
result — and learns which of its media objects another completed task of the same key still
points to; only the others are deleted (:func:`charai.task_store.removal.remove_task`). Tasks
that share media always share the key, so that one indexed lookup finds every sharer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import structlog
from charai.core.domain import lifecycle
from charai.core.domain.lifecycle import ClaimAnswer, ClaimOutcome, Decision, Policy, TaskState, Twin
from charai.core.domain.states import EventType, Status
from charai.core.media import media_keys
from charai.task_store.backend import Backend, Dialect, Tx
from charai.task_store.schema import REUSABLE
from charai.tasks.v1 import task_pb2

log = structlog.get_logger("reuse")

#: Prefix of a detached task's key: it matches no claim's lookup any more, and a repeated delete
#: (after a crash between the media and the rows) still finds the key's other tasks.
DETACHED = "-"
#: First half of the PostgreSQL transaction lock on a key ("chrR"); the second half is 32 bits
#: of the key. Two-int advisory locks are a namespace apart from the one-bigint events lock.
KEY_LOCK_CLASS = 0x63687252
#: Version of the key's recipe: a change to it must not match keys written by the old one.
_RECIPE = "1"


@dataclasses.dataclass(frozen=True, slots=True)
class ReuseConfig:
    """Reuse settings: ``ttl_seconds`` (``CHARAI_REUSE_TTL_SECONDS``; 0: off, this default, so a
    store built in code reuses nothing unless told) and the provider dialect and model of each
    type, which are part of the key."""

    ttl_seconds: float = 0.0
    tts_provider: str = "zhipu"
    tts_model: str = "glm-tts"
    image_provider: str = "zhipu"
    image_model: str = "glm-image"

    @property
    def enabled(self) -> bool:
        return self.ttl_seconds > 0


def opted_in(task: task_pb2.Task) -> bool:
    """Whether the request asks for reuse: TTS unless ``reuse: false``; an image only with a seed
    (two calls with the same prompt give two different images)."""
    if task.HasField("tts"):
        return not task.tts.HasField("reuse") or task.tts.reuse
    if task.HasField("image"):
        return task.image.HasField("seed")
    return False


def _shaping_fields(task: task_pb2.Task, config: ReuseConfig) -> tuple[str, str, dict[str, Any]] | None:
    """(provider, model, the payload fields that shape the output), normalized as the workers
    read them (an unset speed is 1, an empty format wav)."""
    if task.HasField("tts"):
        t = task.tts
        fields = {
            "text": t.text,
            "voice": t.voice_style,
            "speed": float(t.speed) if t.HasField("speed") else 1.0,
            "volume": float(t.volume) if t.HasField("volume") else 1.0,
            "format": t.response_format.strip().lower() or "wav",
        }
        return config.tts_provider, config.tts_model, fields
    if task.HasField("image"):
        p = task.image
        fields = {
            "prompt": p.prompt,
            "resolution": p.resolution,
            "quality": p.quality,
            "output_format": p.output_format,
            "seed": int(p.seed),
        }
        return config.image_provider, config.image_model, fields
    return None


#: The key's canonical JSON (``json.dumps`` with these options builds an encoder per call).
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def reuse_key(tenant: str, task: task_pb2.Task, config: ReuseConfig) -> str | None:
    """The task's reuse key (hex SHA-256), or None when it takes no part in reuse."""
    if not config.enabled or not opted_in(task):
        return None
    shaping = _shaping_fields(task, config)
    if shaping is None:
        return None
    provider, model, fields = shaping
    canonical = _CANONICAL.encode([_RECIPE, tenant, int(task.type), provider, model, fields])
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class Found:
    """A twin a claim found: what the core sees of it, and the stored task (for its result)."""

    seen: Twin
    task: task_pb2.Task

    def copier(self, task: task_pb2.Task) -> Callable[[lifecycle.Event], None]:
        """The ``on_event`` of a reusing claim: the twin's result onto ``task`` at its completion."""

        def copy(event: lifecycle.Event) -> None:
            if event.type is EventType.COMPLETED:
                copy_result(task, self.task)

        return copy


def copy_result(task: task_pb2.Task, twin: task_pb2.Task) -> None:
    """``twin``'s result onto ``task``, marked reused. ``reused_from_task_id`` names the task whose
    provider call made the media (a twin that reused passes its own source on)."""
    kind = twin.WhichOneof("result")
    if kind == "image_result":
        result: Any = task.image_result
        result.CopyFrom(twin.image_result)
    elif kind == "tts_result":
        result = task.tts_result
        result.CopyFrom(twin.tts_result)
    else:  # pragma: no cover - a COMPLETED task always has its result
        raise RuntimeError(f"completed task {twin.id} has no result")
    result.reused_from_task_id = result.reused_from_task_id if result.reused else twin.id
    result.reused = True


class Reuse:
    """The store's side of reuse: the key at create, twins at claim, shared media at delete."""

    def __init__(self, backend: Backend, config: ReuseConfig) -> None:
        self._db = backend
        self._dialect: Dialect = backend.dialect
        self.config = config
        self._ttl_us = int(config.ttl_seconds * 1_000_000)

    def key(self, tenant: str, task: task_pb2.Task) -> str | None:
        return reuse_key(tenant, task, self.config)

    def usage_of(self, task: task_pb2.Task) -> task_pb2.Usage:
        """The usage a reused completion of ``task`` records: the provider and model its key names
        (those its twin's call was made with), marked reused; no call, no units, priced 0."""
        shaping = _shaping_fields(task, self.config)
        provider, model = ("", "") if shaping is None else shaping[:2]
        return task_pb2.Usage(provider=provider, model=model, reused=True)

    def wanted(self, task: task_pb2.Task, decision: Decision[Any]) -> bool:
        """Whether a claim's decision should look for a twin: it starts a new attempt (not the
        same one answered again) of a task that asked for reuse, and reuse is on."""
        answer = decision.answer
        starts = (
            isinstance(answer, ClaimAnswer) and answer.outcome is ClaimOutcome.RUN and bool(decision.events)
        )
        return starts and self.config.enabled and opted_in(task)

    async def reconsider(
        self,
        tx: Tx,
        task: task_pb2.Task,
        key: str | None,
        tenant: str,
        state: TaskState,
        cmd: lifecycle.Claim,
        decision: Decision[ClaimAnswer],
        now: int,
        policy: Policy,
    ) -> tuple[Decision[ClaimAnswer], Callable[[lifecycle.Event], None] | None]:
        """A claim's decision in the light of a twin, and what to do at its events (copy the
        twin's result at the completion). ``decision`` itself when no twin matters. ``key``:
        the task row's ``reuse_key``.

        A reused completion is metered by the caller (:meth:`usage_of`): one usage record
        marked reused, with no call, no units and no cost.
        """
        if not self.wanted(task, decision):
            return decision, None
        found = await self.twin(tx, task.id, key, tenant, now)
        if found is None:
            return decision, None
        decided = lifecycle.claim(state, dataclasses.replace(cmd, twin=found.seen), now, policy)
        answer = decided.answer
        if isinstance(answer, ClaimAnswer) and answer.outcome is ClaimOutcome.REUSED:
            log.info("task_reused", task_id=task.id, twin=found.task.id)
            return decided, found.copier(task)
        return decided, None

    async def _lock(self, tx: Tx, key: str) -> None:
        if self._dialect.key_lock is not None:
            half = int(key[:8], 16) - (1 << 31)  # 32 bits of the key, as a signed int4
            await tx.execute(self._dialect.key_lock, KEY_LOCK_CLASS, half)

    async def twin(self, tx: Tx, task_id: str, key: str | None, tenant: str, now: int) -> Found | None:
        """The newest COMPLETED task of ``tenant`` with the task's key within the TTL, else one
        RUNNING under a live lease; None without one (or without a key). Takes the key's lock
        (PostgreSQL) first: the caller holds the task's row lock already."""
        if not key or key.startswith(DETACHED):
            return None
        await self._lock(tx, key)
        completed, running, cutoff = int(Status.COMPLETED), int(Status.RUNNING), now - self._ttl_us
        # The newest COMPLETED (else RUNNING) task of the key, whatever its age or lease: mostly
        # there is none, and this lookup costs a fifth of the one below (`python -m bench.push_unit`).
        raw = await tx.fetchrow(
            "SELECT status, task, update_time, lease_expires FROM tasks WHERE tenant = ? AND reuse_key = ?"
            f" AND id <> ? AND {REUSABLE} ORDER BY status DESC, update_time DESC LIMIT 1",
            tenant,
            key,
            task_id,
        )
        if raw is None:
            return None
        status, _, updated, lease_expires = raw
        alive = status == running and (lease_expires or 0) > now
        if not (alive or (status == completed and updated >= cutoff)):
            # Too old, or a lost lease: an older twin may still do (a rare case, looked up exactly).
            raw = await tx.fetchrow(
                "SELECT status, task FROM tasks WHERE tenant = ? AND reuse_key = ?"
                f" AND id <> ? AND {REUSABLE} AND ((status = ? AND update_time >= ?)"
                " OR (status = ? AND lease_expires > ?))"
                " ORDER BY status DESC, update_time DESC LIMIT 1",
                tenant,
                key,
                task_id,
                completed,
                cutoff,
                running,
                now,
            )
            if raw is None:
                return None
        twin = task_pb2.Task.FromString(raw[1])
        start = twin.start_time.ToMicroseconds() if twin.HasField("start_time") else None
        return Found(Twin(Status(raw[0]), start), twin)

    async def shared_media(self, tenant: str, task_id: str) -> frozenset[str]:
        """Detaches an ended task from reuse (no claim copies its result after this commits) and
        answers the media keys of its result that another completed task still points to: the
        ones its removal must leave alone. Repeatable (a retried delete answers the same)."""

        async def body(tx: Tx) -> frozenset[str]:
            raw = await tx.fetchrow(
                f"SELECT reuse_key, task FROM tasks WHERE id = ? AND tenant = ?{self._dialect.for_update}",
                task_id,
                tenant,
            )
            if raw is None or not raw[0]:
                return frozenset()
            stored: str = raw[0]
            key = stored.removeprefix(DETACHED)
            await self._lock(tx, key)
            if not stored.startswith(DETACHED):
                await tx.execute("UPDATE tasks SET reuse_key = ? WHERE id = ?", DETACHED + key, task_id)
            mine = set(media_keys(task_pb2.Task.FromString(raw[1])))
            if not mine:
                return frozenset()
            others = await tx.fetch(
                f"SELECT task FROM tasks WHERE tenant = ? AND reuse_key = ? AND {REUSABLE} AND status = ?",
                tenant,
                key,
                int(Status.COMPLETED),
            )
            used = {k for (blob,) in others for k in media_keys(task_pb2.Task.FromString(blob))}
            return frozenset(mine & used)

        return await self._db.write(body)
