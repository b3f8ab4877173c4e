"""Congestion windows as grid-signal sources: the site config's and the store's (`cem congestion
add`). Each window becomes a `CongestionLimit` carrying its source and its id there (`ref`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from cem.ports import CongestionLimit, Publish, SignalUpdate, SourceState
from cem.site.config import CongestionWindow
from sitekit import clock as process_clock

logger = logging.getLogger("cem.signals")


def describe_limit(window: CongestionLimit) -> str:
    """'import 10 kW', 'export 5 kW' or 'import 10 kW, export 5 kW'."""
    parts = []
    if window.import_limit_kw is not None:
        parts.append(f"import {window.import_limit_kw:g} kW")
    if window.export_limit_kw is not None:
        parts.append(f"export {window.export_limit_kw:g} kW")
    return ", ".join(parts) or "no limit"


def describe_window(window: CongestionLimit) -> str:
    """'congestion window 17:00-20:00 UTC (import 10 kW)'."""
    return (f"congestion window {window.start.astimezone(UTC):%H:%M}-"
            f"{window.end.astimezone(UTC):%H:%M} UTC ({describe_limit(window)})")


class ConfigCongestion:
    """The config's `[[congestion]]` windows (source "config"): published once."""

    def __init__(self, windows: Iterable[CongestionWindow], name: str = "config") -> None:
        self.name = name
        self.limits = tuple(
            CongestionLimit(start=w.start.astimezone(UTC), end=w.end.astimezone(UTC),
                            import_limit_kw=w.import_limit_kw, export_limit_kw=w.export_limit_kw,
                            source=name, ref=f"congestion[{i}]")
            for i, w in enumerate(windows))
        self._published: datetime | None = None

    async def run(self, publish: Publish) -> None:
        publish(SignalUpdate(source=self.name,
                             reason=f"{len(self.limits)} congestion window(s) in the config",
                             congestion=self.limits))
        self._published = process_clock.now()
        await asyncio.Event().wait()  # nothing changes until the config does (a restart)

    def state(self) -> SourceState:
        return SourceState(name=self.name, kind="congestion", ok=True,
                           detail=f"{len(self.limits)} window(s) in the config",
                           last_update=self._published)


class StoreCongestion:
    """The store's congestion table (`cem congestion add`), polled every `poll_s` seconds.

    Publishes at once, then whenever the windows ending after now change: "congestion window
    17:00-20:00 UTC (import 10 kW) was added", else "congestion windows changed".
    """

    def __init__(self, store: Any, *, name: str = "cli", poll_s: float = 5.0,
                 clock: Callable[[], datetime] = process_clock.now) -> None:
        self.name = name
        self.store = store
        self.poll_s = poll_s
        self.clock = clock
        self._key: tuple[Any, ...] | None = None
        self._limits: tuple[CongestionLimit, ...] = ()
        self._error: str | None = None
        self._last: datetime | None = None

    async def run(self, publish: Publish) -> None:
        while True:
            try:
                update = await self.refresh()
                self._error = None
            except Exception as exc:  # a locked or broken database: say so, try again
                if self._error is None:
                    logger.exception("reading congestion windows from the store failed")
                self._error = f"reading the store failed: {type(exc).__name__}: {exc}"
                update = None
            if update is not None:
                publish(update)
            await asyncio.sleep(self.poll_s)

    async def refresh(self) -> SignalUpdate | None:
        """Read the windows; the update to publish when they changed (or on the first read)."""
        rows = await self.store.list_congestion(ending_after=self.clock())
        key = tuple((r.window_id, r.start, r.end, r.import_limit_kw, r.export_limit_kw)
                    for r in rows)
        previous, self._key = self._key, key
        if key == previous:
            return None
        self._limits = tuple(
            CongestionLimit(start=r.start, end=r.end, import_limit_kw=r.import_limit_kw,
                            export_limit_kw=r.export_limit_kw, source=r.source or self.name,
                            ref=str(r.window_id)) for r in rows)
        self._last = process_clock.now()
        if previous is None:
            reason = f"{len(rows)} congestion window(s) in the store"
        else:
            known = {k[0] for k in previous}
            added = [w for w, r in zip(self._limits, rows, strict=True) if r.window_id not in known]
            reason = (f"{describe_window(added[0])} was added" if added
                      else "congestion windows changed")
        return SignalUpdate(source=self.name, reason=reason, congestion=self._limits)

    def state(self) -> SourceState:
        if self._error is not None:
            return SourceState(name=self.name, kind="congestion", ok=False, detail=self._error,
                               last_update=self._last)
        return SourceState(name=self.name, kind="congestion", ok=self._key is not None,
                           detail=f"{len(self._limits)} window(s) in the store"
                           if self._key is not None else "not read yet",
                           last_update=self._last)
