"""Keeps a :class:`~charai.worker.shared_gate.SharedGate` in step with its record in the NATS
KV bucket: the I/O half of the shared limiter and breaker.

* **writes** go out one at a time from one task, each a compare-and-set of the record the
  gate last read, with the gate's pending news applied and its holding recomputed
  (:meth:`SharedGate.compose`). A lost race re-reads the record and tries again. A write is
  made only when something needs telling (:meth:`SharedGate.needs_write`): news, a holding
  that should change, a heartbeat. A worker busy at its share writes about once per round
  trip (its successes), not once per call.
* **a watch** on the key brings every other worker's writes: slots given back wake this
  worker's waiters, a breaker opened elsewhere fails them.
* **heartbeats** every ``lease / 3`` seconds keep this worker's holding alive; a worker that
  stops (crashed) is dropped by the others' next write after ``lease``. A heartbeat also
  restarts a watch that missed this worker's own last write.
* **the probe claim**: the compare-and-set that makes one call, across every worker, the
  breaker's half-open probe.
* any failure to write (NATS away, a timeout) puts the gate on its local limit until a write
  succeeds again; writes are retried with a capped backoff meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from charai.core import natsconn
from charai.core.clock import SYSTEM, Clock
from charai.core.domain import breaker as brk
from charai.core.provider_kv import ConflictError, RecordStore
from charai.worker.shared_gate import SharedGate

log = structlog.get_logger("provider")

#: A write (or read) of the record that takes longer than this counts as NATS being away.
WRITE_TIMEOUT = 2.0
#: Compare-and-set attempts before a write gives up (and the gate goes local for a while).
MAX_CONFLICTS = 50


class GateSync:
    """The KV side of one :class:`SharedGate`; ``async with`` starts it, ``close()`` (idempotent)
    stops it and takes this worker's holding out of the record."""

    def __init__(
        self,
        gate: SharedGate,
        store: RecordStore,
        *,
        connected: Callable[[], bool],
        clock: Clock = SYSTEM,
        timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self._gate = gate
        self._store = store
        self._connected = connected
        self._clock = clock
        self._timeout = timeout
        self._wake = asyncio.Event()
        self._watched = 0
        self._lagging = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    async def start(self) -> None:
        self._gate.sync = self
        try:
            await self._reload()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NATS away at start: local limits until it answers
            self._gate.degrade(type(exc).__name__)
        self._tasks = {
            "writer": asyncio.create_task(self._writer(), name="provider-gate-writer"),
            "watcher": asyncio.create_task(self._watcher(), name="provider-gate-watcher"),
            "heartbeat": asyncio.create_task(self._heartbeat(), name="provider-gate-heartbeat"),
        }
        self.poke()

    def poke(self) -> None:
        """Something may need writing: the writer looks (cheap when nothing does)."""
        self._wake.set()

    async def _writer(self) -> None:
        backoff = 0.25
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._gate.needs_write():
                continue
            try:
                await self._write_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._gate.degrade(type(exc).__name__)
                await self._clock.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                self._wake.set()
                continue
            backoff = 0.25
            self._gate.recover()

    async def _write_once(self) -> None:
        for _ in range(MAX_CONFLICTS):
            if not self._connected():
                raise ConnectionError("not connected to NATS")
            current, revision = self._gate.current()
            events = self._gate.pending()
            record = self._gate.compose(current, events)
            try:
                async with asyncio.timeout(self._timeout):
                    written = await self._store.write(record, revision)
            except ConflictError:
                await self._reload()
                continue
            self._gate.written(written, record, len(events))
            return
        raise RuntimeError(f"{MAX_CONFLICTS} conflicting writes in a row")

    async def _reload(self) -> None:
        async with asyncio.timeout(self._timeout):
            revision, record = await self._store.load()
        if record is None:
            self._gate.forget()
        else:
            self._gate.accept(revision, record)

    async def claim_probe(self) -> bool:
        """Makes this worker's call the breaker's half-open probe, if no other worker's call is
        (compare-and-set on the latest record: exactly one wins). ``False``: lost, or NATS away
        (no probe without the shared record)."""
        if self._gate.degraded or not self._connected():
            return False
        try:
            for _ in range(MAX_CONFLICTS):
                current, revision = self._gate.current()
                base = current or self._gate.base
                now = self._clock.time()
                breaker = brk.start_probe(base.breaker, self._gate.me, now, self._gate.policy.probe_timeout)
                if breaker is None:
                    return False
                record = base.with_breaker(breaker)
                try:
                    async with asyncio.timeout(self._timeout):
                        written = await self._store.write(record, revision)
                except ConflictError:
                    await self._reload()
                    continue
                self._gate.accept(written, record)
                return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("provider_breaker_probe_not_claimed", error=type(exc).__name__)
        return False

    async def _watcher(self) -> None:
        while True:
            try:
                async for revision, record in self._store.watch():
                    self._watched = max(self._watched, revision)
                    self._gate.accept(revision, record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("provider_gate_watch_restarting", error=type(exc).__name__)
            await self._clock.sleep(1.0)

    async def _heartbeat(self) -> None:
        interval = max(0.05, self._gate.lease / 3)
        while True:
            await self._clock.sleep(interval)
            self._gate.heartbeat_due = True
            self.poke()
            # A watch that has not delivered this worker's own write of a beat ago is stuck.
            _, written = self._gate.current()
            if self._lagging and written > self._watched:
                log.info("provider_gate_watch_stuck")
                self._tasks["watcher"].cancel()
                self._tasks["watcher"] = asyncio.create_task(self._watcher(), name="provider-gate-watcher")
            self._lagging = written > self._watched

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await natsconn.cancel_and_wait(list(self._tasks.values()))
        self._gate.close()
        await self._leave()
        self._gate.sync = None

    async def _leave(self) -> None:
        """Writes this worker's last news and takes its holding out (best effort: a crashed or
        cut-off worker's holding expires after the lease anyway)."""
        with contextlib.suppress(Exception):
            for _ in range(5):
                if not self._connected():
                    return
                current, revision = self._gate.current()
                if current is None and not self._gate.pending():
                    return
                record = self._gate.compose(current, self._gate.pending()).without(self._gate.me)
                try:
                    async with asyncio.timeout(self._timeout):
                        await self._store.write(record, revision)
                    return
                except ConflictError:
                    await self._reload()

    async def __aenter__(self) -> GateSync:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
