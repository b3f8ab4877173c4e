"""The long-running CEM keeps full garbage collections short and still frees closed sessions."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable

from cem.app.service import tenure_long_lived


async def within(seconds: float, condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds, at most `seconds`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not condition():
        assert loop.time() < end, "not within the time"
        await asyncio.sleep(0.01)


class _Session:
    """Stands in for a closed RM session: an object in a reference cycle."""

    def __init__(self) -> None:
        self.me = self


async def test_long_lived_objects_are_frozen_and_cycles_of_closed_sessions_reclaimed() -> None:
    gc.unfreeze()
    stop = asyncio.Event()
    session = _Session()
    gone = weakref.ref(session)
    try:
        task = asyncio.create_task(tenure_long_lived(stop, every_s=0.05, reclaim_every=4))
        # one round: the session, still alive, is frozen (the rounds come later on a busy
        # machine: waited for, not slept for)
        await within(5.0, lambda: gc.get_freeze_count() > 0)
        del session  # the RM disconnects: only its cycle keeps it
        gc.collect()
        assert gone() is not None, "a frozen cycle is not collected by a normal collection"
        await within(5.0, lambda: gone() is None)  # the fourth round thaws and collects
        stop.set()
        await asyncio.wait_for(task, 1)
    finally:
        stop.set()
        gc.unfreeze()
