"""The parts of a running site and the supervisor that keeps them up (`cem run`).

A **part** is one thing `cem run` runs: the CEM core (store, S2 server, control loop), a
grid-signal source, S2 Connect, the OCPP central system, one Modbus RM, the HTTP server. Every
part is driven the same way through a small interface (`Part`):

- `bind()`: take what can clash with another program: database locks, listening sockets. The
  supervisor binds *every* part before it starts *any*, so a busy port or a second instance on
  the same database stops `cem run` before anything is opened, recovered or written;
- `start()` / `stop()`: bring it up (raise when it cannot) / take it down (never raises);
- `health()`: how it is doing now (`Health`: ok, and a line for `cem status`), e.g. a Modbus RM
  whose device does not answer is up but not ok;
- `wait()`: returns or raises when the part died on its own (a crashed task).

The **supervisor** starts the parts in order and watches each in its own task. A part that
dies is logged with its cause (the traceback) and restarted after a back-off that doubles per
failure in a row (1 s, 2 s, 4 s ... up to a minute; a part that ran a minute starts again at
1 s); the others keep running. A part that failed `failing_after` times in a row, or has not
been healthy for `unhealthy_after_s`, is *failing*: logged as an error and shown so in `cem
status` (which then exits non-zero). A *critical* part (the CEM core: every other part talks to
it) is not restarted in process: its failure stops every part cleanly and `cem run` exits 1, so
the init system (Docker's restart policy, systemd) starts it afresh.

Part states go to the store's `service_parts` table (`PartBook`), so `cem status` (another
process) can show them; it is the supervisor's own table, created when it first writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

logger = logging.getLogger("cem.supervisor")

#: what a part can be, as `cem status` shows it
STATES = ("starting", "running", "degraded", "restarting", "failing", "stopped")


@dataclass(frozen=True)
class Health:
    """How a part is doing, in its own words."""

    ok: bool = True
    detail: str = ""


class Part(Protocol):
    """One supervised part of a running site (see the module docstring)."""

    name: str       # unique, shown in logs and `cem status` ("cem", "ocpp", "modbus battery")
    kind: str       # "cem", "signals", "s2connect", "ocpp", "modbus", "http", ...
    critical: bool  # its failure stops the service (no in-process restart)

    async def bind(self) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> Health: ...

    async def wait(self) -> None: ...


class BasePart:
    """Defaults for a part: nothing to bind, always healthy, never dies on its own."""

    name = "part"
    kind = "part"
    critical = False

    async def bind(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def health(self) -> Health:
        return Health()

    async def wait(self) -> None:
        await asyncio.Event().wait()


class TaskPart(BasePart):
    """A part that is one coroutine: started as a task, dead when the task ends."""

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        self._task: asyncio.Task[None] | None = None

    async def main(self) -> None:
        """The part's work, until cancelled."""
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.main(), name=f"part-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def wait(self) -> None:
        if self._task is None:
            await asyncio.Event().wait()
        else:
            await asyncio.shield(self._task)


class PartEnded(Exception):
    """A part's work returned although nobody stopped it."""


class StartFailed(Exception):
    """A part could not be bound or started at `cem run`'s start; the message says why."""

    def __init__(self, part: str, cause: BaseException) -> None:
        self.part = part
        self.cause = cause
        super().__init__(str(cause) or repr(cause))


@dataclass
class PartState:
    """What the supervisor knows of one part (a row of `service_parts`)."""

    name: str
    kind: str
    state: str = "starting"
    detail: str = ""
    restarts: int = 0
    failures_in_row: int = 0
    since: float = field(default_factory=time.time)
    last_error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "state": self.state,
                "detail": self.detail, "restarts": self.restarts,
                "since": self.since, "last_error": self.last_error}


class PartBook:
    """The `service_parts` table in the CEM store: the supervisor writes, `cem status` reads.

    Plain sqlite3 in a worker thread (a few rows, written only when a state changes), so it
    works whatever the core part's own store connection is doing.
    """

    SCHEMA = ("CREATE TABLE IF NOT EXISTS service_parts (name TEXT PRIMARY KEY, kind TEXT NOT "
              "NULL, state TEXT NOT NULL, detail TEXT, restarts INTEGER NOT NULL DEFAULT 0, "
              "since REAL NOT NULL, last_error TEXT, pid INTEGER NOT NULL, updated_at REAL NOT "
              "NULL)")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _write(self, states: list[PartState], fresh: bool) -> None:
        db = sqlite3.connect(self.path, timeout=10)
        try:
            db.execute("PRAGMA busy_timeout=10000")
            db.execute(self.SCHEMA)
            if fresh:
                db.execute("DELETE FROM service_parts")
            now = time.time()
            db.executemany(
                "INSERT OR REPLACE INTO service_parts (name, kind, state, detail, restarts, "
                "since, last_error, pid, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                [(s.name, s.kind, s.state, s.detail, s.restarts, s.since, s.last_error,
                  os.getpid(), now) for s in states])
            db.commit()
        finally:
            db.close()

    async def write(self, states: list[PartState], *, fresh: bool = False) -> None:
        try:
            await asyncio.to_thread(self._write, states, fresh)
        except sqlite3.Error as exc:
            logger.warning("cannot record the parts' states in %s: %s", self.path, exc)


def read_parts(db: sqlite3.Connection) -> list[dict[str, object]]:
    """The parts' rows of a store (empty when no supervisor ever wrote them)."""
    try:
        rows = db.execute("SELECT name, kind, state, detail, restarts, since, last_error, pid, "
                          "updated_at FROM service_parts ORDER BY rowid").fetchall()
    except sqlite3.OperationalError:
        return []
    keys = ("name", "kind", "state", "detail", "restarts", "since", "last_error", "pid",
            "updated_at")
    return [dict(zip(keys, row, strict=True)) for row in rows]


class Supervisor:
    """Binds, starts, watches, restarts and stops the parts (see the module docstring)."""

    def __init__(self, parts: Sequence[Part], *, backoff_s: tuple[float, float] = (1.0, 60.0),
                 failing_after: int = 3, stable_s: float = 60.0,
                 unhealthy_after_s: float = 60.0, health_every_s: float = 2.0,
                 start_grace_s: float = 10.0,
                 book: PartBook | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"part names must be unique: {names}")
        self.parts = list(parts)
        self.backoff_s = backoff_s
        self.failing_after = failing_after
        self.stable_s = stable_s
        self.unhealthy_after_s = unhealthy_after_s
        self.health_every_s = health_every_s
        self.start_grace_s = start_grace_s  # a part just started may not be healthy yet
        self.book = book
        self.clock = clock
        self.states = {p.name: PartState(p.name, p.kind) for p in self.parts}
        self.fatal = asyncio.Event()      # a critical part died
        self.fatal_reason = ""
        self._started: list[Part] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._health_task: asyncio.Task[None] | None = None
        self._up_since: dict[str, float] = {}
        self._unhealthy_since: dict[str, float] = {}
        self._dirty = asyncio.Event()
        self._stopping = False

    # --- start and stop ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every part, then start each in order; raise StartFailed (with every part
        already started stopped again) when one cannot."""
        for part in self.parts:
            try:
                await part.bind()
            except Exception as exc:
                await self._undo()
                raise StartFailed(part.name, exc) from exc
        for part in self.parts:
            try:
                await part.start()
            except Exception as exc:
                self._started.append(part)  # stop() cleans up what it opened
                await self._undo()
                raise StartFailed(part.name, exc) from exc
            self._started.append(part)
            self._set(part, "starting", part.health().detail)
            self._up_since[part.name] = self.clock()
            logger.info("part %s (%s) started", part.name, part.kind)
        self._watchers = [asyncio.get_running_loop().create_task(self._watch(p),
                                                                 name=f"watch-{p.name}")
                          for p in self.parts]
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop(),
                                                                   name="supervisor-health")
        self.refresh_health()
        if self.book is not None:
            await self.book.write(list(self.states.values()), fresh=True)

    async def _undo(self) -> None:
        """Stop what was started and unbind everything (a failed start changes nothing more)."""
        for part in reversed(self.parts):
            with contextlib.suppress(Exception):
                await part.stop()
        self._started = []

    async def stop(self) -> None:
        """Stop watching, then stop the parts in reverse order."""
        self._stopping = True
        tasks = [*self._watchers, *([self._health_task] if self._health_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watchers, self._health_task = [], None
        for part in reversed(self.parts):
            try:
                await part.stop()
            except Exception:
                logger.exception("part %s did not stop cleanly", part.name)
            self._set(part, "stopped", "")
        if self.book is not None:
            await self.book.write(list(self.states.values()))

    # --- watching -------------------------------------------------------------------------

    def _set(self, part: Part, state: str, detail: str, error: str | None = None) -> None:
        current = self.states[part.name]
        if current.state != state:
            current.since = time.time()
        changed = (current.state, current.detail) != (state, detail) or error is not None
        current.state, current.detail = state, detail
        if error is not None:
            current.last_error = error
        if changed:
            self._dirty.set()

    async def _watch(self, part: Part) -> None:
        while True:
            try:
                await part.wait()
                raise PartEnded("it ended by itself")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
                if part.critical:
                    logger.error("part %s failed: %s; stopping the service (the init system "
                                 "restarts it)", part.name, error, exc_info=exc,
                                 extra={"part": part.name})
                    self._set(part, "failing", f"failed: {error}", error)
                    self.fatal_reason = f"{part.name} failed: {error}"
                    self.fatal.set()
                    return
                logger.error("part %s failed: %s", part.name, error, exc_info=exc,
                             extra={"part": part.name})
                await self._restart(part, error)

    async def _restart(self, part: Part, error: str) -> None:
        """Stop what is left of `part`, wait the back-off, start it again (until it starts)."""
        state = self.states[part.name]
        while True:
            up = self._up_since.pop(part.name, None)
            if up is not None and self.clock() - up >= self.stable_s:
                state.failures_in_row = 0  # it had run well: start again from a short wait
            state.failures_in_row += 1
            low, high = self.backoff_s
            delay = min(high, low * 2 ** (state.failures_in_row - 1))
            failing = state.failures_in_row >= self.failing_after
            self._set(part, "failing" if failing else "restarting",
                      f"failed {state.failures_in_row} time(s) in a row: {error}; "
                      f"restarting in {delay:g} s", error)
            if failing:
                logger.error("part %s keeps failing (%d times in a row, last: %s); next try "
                             "in %g s", part.name, state.failures_in_row, error, delay,
                             extra={"part": part.name})
            else:
                logger.warning("part %s: restarting in %g s", part.name, delay,
                               extra={"part": part.name})
            with contextlib.suppress(Exception):
                await part.stop()
            await asyncio.sleep(delay)
            try:
                await part.start()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
                logger.error("part %s did not start again: %s", part.name, error,
                             exc_info=exc, extra={"part": part.name})
                continue
            state.restarts += 1
            self._up_since[part.name] = self.clock()
            self._unhealthy_since.pop(part.name, None)
            self._set(part, "starting", part.health().detail)
            logger.info("part %s is running again (restart %d)", part.name, state.restarts,
                        extra={"part": part.name})
            return

    def refresh_health(self) -> None:
        """Read each running part's health: running, degraded, or failing when unhealthy for
        longer than `unhealthy_after_s`."""
        now = self.clock()
        for part in self.parts:
            state = self.states[part.name]
            if state.state not in ("starting", "running", "degraded") and not (
                    state.state == "failing" and part.name in self._unhealthy_since):
                continue
            try:
                health = part.health()
            except Exception as exc:  # a part's report must not stop the supervisor
                health = Health(False, f"cannot tell: {exc!r}")
            up = self._up_since.get(part.name)
            if state.failures_in_row and up is not None:
                if now - up >= self.stable_s:
                    state.failures_in_row = 0  # it runs well again
                elif state.failures_in_row >= self.failing_after:
                    self._set(part, "failing", f"up again, but it failed "
                              f"{state.failures_in_row} times in a row (last: "
                              f"{state.last_error}); {health.detail}")
                    continue
            if health.ok:
                if part.name in self._unhealthy_since:
                    logger.info("part %s is healthy again: %s", part.name, health.detail,
                                extra={"part": part.name})
                self._unhealthy_since.pop(part.name, None)
                self._set(part, "running", health.detail)
                continue
            if up is not None and now - up < self.start_grace_s and \
                    part.name not in self._unhealthy_since:
                self._set(part, "starting", health.detail)
                continue
            since = self._unhealthy_since.setdefault(part.name, now)
            if now - since >= self.unhealthy_after_s:
                if state.state != "failing":
                    logger.error("part %s keeps failing: %s (for %.0f s)", part.name,
                                 health.detail, now - since, extra={"part": part.name})
                self._set(part, "failing", health.detail)
            else:
                if state.state != "degraded":
                    logger.warning("part %s: %s", part.name, health.detail,
                                   extra={"part": part.name})
                self._set(part, "degraded", health.detail)

    async def _health_loop(self) -> None:
        # the flag, not only the cancellation: Python 3.11's wait_for can swallow a cancel
        while not self._stopping:
            self.refresh_health()
            if self._dirty.is_set():
                self._dirty.clear()
                if self.book is not None:
                    await self.book.write(list(self.states.values()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.health_every_s)

    def snapshot(self) -> list[PartState]:
        """The parts' states now (after a fresh health reading)."""
        self.refresh_health()
        return list(self.states.values())
