"""The long-running CEM keeps full garbage collections short and still frees closed sessions."""

from __future__ import annotations

import asyncio
import gc
import weakref

from cem.app.service import tenure_long_lived


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
        await asyncio.sleep(0.08)  # one round: the session, still alive, is frozen
        assert gc.get_freeze_count() > 0
        del session  # the RM disconnects: only its cycle keeps it
        gc.collect()
        assert gone() is not None, "a frozen cycle is not collected by a normal collection"
        await asyncio.sleep(0.2)  # the fourth round thaws and collects
        assert gone() is None
        stop.set()
        await asyncio.wait_for(task, 1)
    finally:
        stop.set()
        gc.unfreeze()
