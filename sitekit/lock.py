"""One process per database: an exclusive lock file next to it.

A CEM store (`cem.db`) or an OCPP RM database (`ocpp.db`) has one writer that also *recovers*
it at start (marks RMs disconnected, closes sessions left open by a crash). A second process on
the same file must not do that while the first runs: it would close live charging sessions into
CDRs. So before a process opens or recovers such a file (or binds its ports), it takes
`<file>.lock` with `flock` (exclusive, non-blocking): a second one gets `LockHeld`, whose message
names the process holding it (pid, host, command, since when), and touches nothing.

The kernel drops the lock when the process ends, also on `kill -9`, so a crash never leaves a
stale lock behind; the file itself stays (removing it would race with the next taker).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any


class LockHeld(Exception):
    """Another process holds the lock; the message says which and what to do."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path = path
        self.holder = holder
        pid = holder.get("pid", "?")
        host = holder.get("host") or "?"
        what = holder.get("command") or "another process"
        since = holder.get("since")
        super().__init__(
            f"{path.with_suffix('') if path.suffix == '.lock' else path} is already in use by "
            f"{what} (pid {pid} on {host}{f', since {since}' if since else ''}): stop that "
            "process first, or give this one its own database")


def lock_path(database: Path) -> Path:
    """The lock file of a database: `cem.db` -> `cem.db.lock`, beside it."""
    database = Path(database)
    return database.with_name(database.name + ".lock")


def read_holder(path: Path) -> dict[str, Any]:
    """What the lock file says about the process holding it (empty when unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class InstanceLock:
    """An exclusive lock on one database, held until `release()` (or the process ends)."""

    def __init__(self, database: Path, command: str = "") -> None:
        self.database = Path(database)
        self.path = lock_path(self.database)
        self.command = command or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:3])
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> InstanceLock:
        """Take the lock or raise `LockHeld` (nothing else is touched); idempotent."""
        if self._fd is not None:
            return self
        if str(self.database) == ":memory:":
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(self.path, read_holder(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "since": datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the next process in (the file stays, emptied)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> InstanceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
