"""``make run`` supervises its processes: one that dies is restarted, the stack stays up.

When a process of the stack exits (a crash, the OOM killer, ``kill -9``), the supervisor says why
(exit code or signal, its last stderr lines) and starts it again after a backoff (0.5 s, doubling
up to 10 s; back to 0.5 s once it has stayed up 30 s), on the same addresses, so its clients
reconnect: task_store's address, the gateway's ports, NATS's port and store, the emulator's port.
A worker's unacknowledged jobs go to its restarted self (the same durable consumers), after the
ack wait.

A process that keeps crashing before it ever becomes ready (5 times in a row within a minute)
will not be fixed by restarting it: the supervisor then names it and why, and the stack stops
with a non-zero exit. Only Ctrl-C / SIGTERM stop a healthy stack (draining, as ``Stack.close``).
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from charai.core.clock import SYSTEM, Clock
from charai.core.restarts import RestartPolicy, RestartTracker, Verdict
from charai.devstack.stack import Proc, Stack

__all__ = ["CrashLoopError", "RestartPolicy", "RestartTracker", "Supervisor", "Verdict"]

#: NATS and the emulator first (the services need them), then the services in dependency order.
SUPPORT = ("nats", "emulator")


class CrashLoopError(Exception):
    """A process kept crashing at start; the message names it and says why."""


class Supervisor:
    """Starts a :class:`Stack` and keeps every process of it running (see the module doc).

    ``async with Supervisor(stack) as sup: code = await sup.run(stop)``: :meth:`run` returns 0
    when ``stop`` is set and 1 when a process kept crashing at start; leaving the block stops the
    whole stack (draining).
    """

    def __init__(
        self,
        stack: Stack,
        policy: RestartPolicy | None = None,
        *,
        out: TextIO = sys.stdout,
        clock: Clock = SYSTEM,
    ) -> None:
        self.stack = stack
        self.policy = policy or RestartPolicy()
        self._out = out
        self._clock = clock
        self._trackers: dict[str, RestartTracker] = {}
        self._watchers: list[asyncio.Task[None]] = []

    def say(self, text: str) -> None:
        for line in text.splitlines():
            self._out.write(f"[{'devstack':>12}] {line}\n")
        self._out.flush()

    async def start(self) -> None:
        """NATS and the emulator, then each service until it is ready (restarting one that
        crashes at start, as later; :class:`CrashLoopError` when it keeps crashing). Each process
        is watched from the moment it is ready."""
        await self.stack.prepare()
        for name in SUPPORT:
            if name in self.stack.procs:
                self._trackers[name] = RestartTracker(self.policy)
                self._trackers[name].ready(self._clock.monotonic())
                self.say(f"{name} ready (pid {self.stack.procs[name].pid})")
                self._supervise(name)
        order = self.stack.service_order()
        workers = [n for n in order if n.endswith("_worker")]
        for name in [n for n in order if n not in workers]:
            await self._bring_up(name)
            self._supervise(name)
        try:
            async with asyncio.TaskGroup() as group:  # the workers together: mostly imports
                for name in workers:
                    group.create_task(self._bring_up(name))
        except* CrashLoopError as failed:
            raise failed.exceptions[0] from None
        for name in workers:
            self._supervise(name)

    def _supervise(self, name: str) -> None:
        self._watchers.append(asyncio.create_task(self._watch(name), name=f"supervise-{name}"))

    async def run(self, stop: asyncio.Event) -> int:
        """Until ``stop`` is set (0) or a process keeps crashing at start (1, said why)."""
        stopped = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopped, *self._watchers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        for task in done:
            if task is not stopped:
                self.report(task.exception())
                return 1
        return 0

    def report(self, exc: BaseException | None) -> None:
        """Says why the stack stops (on the stack's output and on stderr)."""
        if isinstance(exc, CrashLoopError):
            message = f"{exc}\nstopping the stack"
        else:
            message = f"supervising failed ({exc!r}); stopping the stack"
        self.say(message)
        sys.stderr.write(f"devstack: {message}\n")
        sys.stderr.flush()

    async def _bring_up(self, name: str) -> None:
        """Starts ``name`` and waits until it is ready; a start that crashes is retried after the
        backoff, until the policy gives up (:class:`CrashLoopError`)."""
        tracker = self._trackers.setdefault(name, RestartTracker(self.policy))
        while True:
            proc = await self.stack.respawn(name)
            tracker.started()
            try:
                await self.stack.wait_ready(name, self.policy.ready_timeout)
            except (RuntimeError, TimeoutError):
                if proc.process.returncode is None:  # hung at start: it counts as a crash
                    await self.stack.stop_service(name, timeout=5)
                await self._settle(proc)
                verdict = tracker.crashed(self._clock.monotonic())
                why = self._why(proc)
                if verdict.give_up:
                    raise CrashLoopError(
                        f"{name} keeps crashing at start ({verdict.start_crashes} times in a row, "
                        f"never ready); last: {why}"
                    ) from None
                self.say(f"{name} (pid {proc.pid}) crashed at start: {why}")
                self.say(f"restarting {name} in {verdict.delay:g} s")
                await self._clock.sleep(verdict.delay)
                continue
            tracker.ready(self._clock.monotonic())
            self.say(f"{name} ready (pid {proc.pid})")
            return

    async def _watch(self, name: str) -> None:
        """Restarts ``name`` each time it dies, for as long as the stack runs."""
        tracker = self._trackers[name]
        while True:
            proc = self.stack.procs[name]
            await proc.process.wait()
            await self._settle(proc)
            verdict = tracker.crashed(self._clock.monotonic())
            self.say(f"{name} (pid {proc.pid}) died: {self._why(proc)}")
            self.say(f"restarting {name} in {verdict.delay:g} s")
            await self._clock.sleep(verdict.delay)
            await self._bring_up(name)

    @staticmethod
    async def _settle(proc: Proc) -> None:
        """Lets the reader take a dead process's last lines."""
        if proc.pump is not None:
            await asyncio.wait([proc.pump], timeout=2)

    @staticmethod
    def _why(proc: Proc) -> str:
        lines = proc.last_lines(8)
        tail = "".join(f"\n    {line[:300]}" for line in lines)
        return f"{proc.exit_reason() or 'still running'}" + (f"; its last lines:{tail}" if tail else "")

    async def close(self) -> None:
        """Stops supervising first (nothing is restarted while the stack stops), then the stack."""
        watchers, self._watchers = self._watchers, []
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await self.stack.close()

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
