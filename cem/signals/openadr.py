"""An OpenADR 3 VEN that follows a grid operator's capacity limits (the Dutch GAC profile).

`OpenAdrVen` is a grid-signal source (`name = "openadr"`). Each poll (`openadr.poll_interval_s`):

1. a token: `openadr.token`, or OAuth2 client credentials at the token endpoint the VTN names
   at `GET /auth/server` (`tokenURL`), renewed before it expires;
2. the VEN registered under `ven_name` (`GET /vens?venName=`, else `POST /vens`), and the
   program named `program` (`GET /programs`);
3. `GET /events?programID=`: every event for one of the site's `targets` (EAN18; 3.0.1
   `{type, values}` targets and 3.1 string targets alike) whose payload is
   `IMPORT_CAPACITY_LIMIT` or `EXPORT_CAPACITY_LIMIT` in kW becomes `CongestionLimit`s, one per
   interval (continuous: the event's `intervalPeriod` repeated; separated: each interval's
   own), with source "openadr" and the event id as `ref`. The whole set is rebuilt every poll,
   so a changed or deleted event replaces or drops its windows and the loop replans.

GAC rules are checked on what arrives (one payload descriptor, units KW, no priority, interval
ids increasing and intervals in time order, one value per interval, continuous or separated);
an event that breaks one is refused, logged once with the reason and listed in `state()`.

The program's safe-mode event (an event whose name says "safe mode") is not applied while the
VTN answers. When the VTN has been unreachable (or refusing) for `safe_mode_after_s`, its limit
applies from then on, on top of the last known windows; without such an event,
`safe_mode_import_limit_kw`, else the lowest import limit the VTN ever sent. Never "no limit":
the last known windows stay in force meanwhile. Plain HTTP only to a loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urljoin

import httpx

from cem.ports import CongestionLimit, Publish, SignalUpdate, SourceState
from cem.signals.congestion import describe_limit
from cem.signals.dayahead import check_base_url
from cem.site.config import OpenAdrConfig
from sitekit import clock as process_clock

logger = logging.getLogger("cem.signals.openadr")

LIMIT_TYPES = {"IMPORT_CAPACITY_LIMIT": "import", "EXPORT_CAPACITY_LIMIT": "export"}
_DURATION = re.compile(r"^P(?:(\d+(?:\.\d+)?)Y)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)W)?"
                       r"(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?"
                       r"(?:(\d+(?:\.\d+)?)S)?)?$")
FOREVER = timedelta(days=3650)


class VtnError(Exception):
    """The VTN could not be reached or refused; the message says how."""


class EventRefused(ValueError):
    """An event breaks a GAC rule; the message is the reason."""


def parse_duration(text: str) -> timedelta:
    """An ISO 8601 duration (PT15M, PT1H, P1D, P9999Y: years are capped as 'forever')."""
    match = _DURATION.match(text or "")
    if not match or text in ("P", "PT"):
        raise EventRefused(f"duration {text!r} is not ISO 8601")
    y, mo, w, d, h, mi, s = (float(g) if g else 0.0 for g in match.groups())
    if y or mo:
        return FOREVER
    return timedelta(weeks=w, days=d, hours=h, minutes=mi, seconds=s)


def parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise EventRefused(f"start {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise EventRefused(f"start {text!r} has no UTC offset")
    return moment.astimezone(UTC)


def target_values(targets: Any) -> list[str]:
    """3.1 string targets, or 3.0.1 `{type, values}` targets, as a flat list of strings."""
    out: list[str] = []
    for target in targets or []:
        if isinstance(target, dict):
            out += [str(v) for v in target.get("values") or []]
        else:
            out.append(str(target))
    return out


def is_safe_mode(event: dict[str, Any]) -> bool:
    name = re.sub(r"[\s_\-]+", " ", str(event.get("eventName") or "")).lower()
    return "safe mode" in name


def event_windows(event: dict[str, Any], *, horizon_end: datetime) -> list[CongestionLimit]:
    """The event's intervals as congestion windows; raises EventRefused (GAC rules)."""
    event_id = str(event.get("id") or "?")
    if event.get("priority") is not None:
        raise EventRefused(f"GAC events carry no priority (got {event['priority']!r})")
    descriptors = event.get("payloadDescriptors") or []
    if len(descriptors) != 1:
        raise EventRefused(f"expected one payload descriptor, got {len(descriptors)}")
    kind = descriptors[0].get("payloadType")
    if kind not in LIMIT_TYPES:
        raise EventRefused(f"payload type {kind!r} is not IMPORT_CAPACITY_LIMIT or "
                           "EXPORT_CAPACITY_LIMIT")
    if descriptors[0].get("units") != "KW":
        raise EventRefused(f"units must be 'KW', got {descriptors[0].get('units')!r}")
    intervals = event.get("intervals") or []
    if not intervals:
        raise EventRefused("the event has no intervals")
    ids = [i.get("id") for i in intervals]
    if not all(isinstance(a, int) and isinstance(b, int) and b > a
               for a, b in itertools.pairwise(ids)):
        raise EventRefused(f"interval ids must increase, got {ids}")
    period = event.get("intervalPeriod")
    own = [i.get("intervalPeriod") for i in intervals]
    if period is not None and any(p is not None for p in own):
        raise EventRefused("intervalPeriod on the event and on intervals: continuous or "
                           "separated, not both")
    if period is None and any(p is None for p in own):
        raise EventRefused("intervalPeriod missing: set it on the event or on every interval")
    windows = []
    previous_end: datetime | None = None
    for index, interval in enumerate(intervals):
        if period is not None:
            length = parse_duration(period.get("duration", ""))
            start = parse_time(period.get("start")) + index * length
        else:
            start = parse_time(own[index].get("start"))
            length = parse_duration(own[index].get("duration", ""))
        end = horizon_end if length in (FOREVER, timedelta(0)) else start + length
        if previous_end is not None and start < previous_end:
            raise EventRefused(f"interval {interval.get('id')} starts before the one before "
                               "it ends: intervals must be in time order")
        previous_end = end
        payloads = interval.get("payloads") or []
        if len(payloads) != 1 or payloads[0].get("type") != kind:
            raise EventRefused(f"interval {interval.get('id')} needs exactly one {kind} payload")
        values = payloads[0].get("values") or []
        if len(values) != 1 or not isinstance(values[0], int | float) or values[0] < 0 \
                or not math.isfinite(values[0]):
            raise EventRefused(f"interval {interval.get('id')}: one value of 0 kW or more, "
                               f"got {values}")
        limit = float(values[0])
        windows.append(CongestionLimit(
            start=start, end=end, source="openadr", ref=event_id,
            import_limit_kw=limit if LIMIT_TYPES[kind] == "import" else None,
            export_limit_kw=limit if LIMIT_TYPES[kind] == "export" else None))
    return windows


class OpenAdrVen:
    """The VEN as a grid-signal source (see the module docstring)."""

    name = "openadr"

    def __init__(self, config: OpenAdrConfig, *, store: Any = None,
                 horizon: timedelta = timedelta(days=2),
                 clock: Callable[[], datetime] = process_clock.now,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.base = check_base_url(config.vtn_url.rstrip("/"))
        self.store = store
        self.horizon = horizon
        self.clock = clock
        self.monotonic = monotonic
        self._token: str | None = config.token
        self._token_expires = math.inf
        self.ven_id: str | None = None
        self.program_id: str | None = None
        self.windows: tuple[CongestionLimit, ...] = ()      # from the events in force
        self.events: dict[str, dict[str, Any]] = {}          # id -> the event as last seen
        self.rejected: dict[str, str] = {}                   # event id -> why
        self.safe_mode_kw: float | None = None               # from the safe-mode event
        self.safe_event_id: str | None = None
        self.lowest_import_kw: float | None = None
        self.last_poll: datetime | None = None
        self.last_ok: datetime | None = None
        self.last_error: str | None = None
        self.unreachable_since: float | None = None          # monotonic
        self.safe_mode_since: datetime | None = None
        self._safe_window: CongestionLimit | None = None
        self._published: list[tuple[Any, ...]] | None = None
        self._last_publish: datetime | None = None

    # --- HTTP --------------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        verify: bool | ssl.SSLContext = True
        if self.config.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.config.ca_file))
        return httpx.AsyncClient(timeout=self.config.timeout_s, verify=verify)

    async def _request(self, client: httpx.AsyncClient, method: str, path: str,
                       **kwargs: Any) -> Any:
        await self._ensure_token(client)
        headers = {"Authorization": f"Bearer {self._token}"}
        url = f"{self.base}/{path.lstrip('/')}"
        try:
            response = await client.request(method, url, headers=headers, **kwargs)
        except httpx.TimeoutException:
            raise VtnError(f"{method} {path}: no answer within {self.config.timeout_s:g} s") \
                from None
        except httpx.TransportError as exc:
            raise VtnError(f"{method} {path}: unreachable ({type(exc).__name__})") from None
        if response.status_code == 401 and self.config.token is None:
            self._token = None  # expired early: a fresh one next time
        if response.status_code >= 400:
            raise VtnError(f"{method} {path}: HTTP {response.status_code} "
                           f"{response.text[:200].strip()}")
        try:
            return response.json()
        except ValueError:
            raise VtnError(f"{method} {path}: the answer is not JSON") from None

    async def _ensure_token(self, client: httpx.AsyncClient) -> None:
        if self.config.token is not None:
            return
        if self._token is not None and self.monotonic() < self._token_expires:
            return
        try:
            server = await client.get(f"{self.base}/auth/server")
            server.raise_for_status()
            token_url = urljoin(self.base + "/", str(server.json()["tokenURL"]))
            check_base_url(token_url)
            answer = await client.post(token_url, data={
                "grant_type": "client_credentials", "client_id": self.config.client_id,
                "client_secret": self.config.client_secret})
        except httpx.TimeoutException:
            raise VtnError("token: no answer in time") from None
        except httpx.TransportError as exc:
            raise VtnError(f"token: unreachable ({type(exc).__name__})") from None
        except (httpx.HTTPStatusError, KeyError, ValueError) as exc:
            raise VtnError(f"token endpoint discovery (/auth/server) failed: {exc}") from None
        if answer.status_code != 200:
            raise VtnError(f"token: HTTP {answer.status_code} (are client_id and "
                           "client_secret right?)")
        body = answer.json()
        self._token = str(body["access_token"])
        expires_in = float(body.get("expires_in") or 3600)
        self._token_expires = self.monotonic() + max(10.0, expires_in - 60)

    # --- one poll ----------------------------------------------------------------------------

    async def poll(self) -> None:
        """Talk to the VTN once: token, VEN, program, events. Raises VtnError."""
        async with self._client() as client:
            if self.ven_id is None:
                self.ven_id = await self._register(client)
            if self.program_id is None:
                programs = await self._request(client, "GET", "programs")
                match = [p for p in programs if p.get("programName") == self.config.program]
                if not match:
                    names = ", ".join(str(p.get("programName")) for p in programs) or "none"
                    raise VtnError(f"program {self.config.program!r} not found on the VTN "
                                   f"(it has: {names})")
                self.program_id = str(match[0]["id"])
            events = await self._request(client, "GET", "events",
                                         params={"programID": self.program_id})
        self._take_events(events)

    async def _register(self, client: httpx.AsyncClient) -> str:
        name = self.config.ven_name
        found = await self._request(client, "GET", "vens", params={"venName": name})
        for ven in found or []:
            if ven.get("venName") == name:
                return str(ven["id"])
        body: dict[str, Any] = {"venName": name}
        if self.config.version == "3.1.0":
            body["objectType"] = "VEN_VEN_REQUEST"
        created = await self._request(client, "POST", "vens", json=body)
        logger.info("OpenADR: registered VEN %s (%s) at %s", name, created.get("id"), self.base)
        return str(created["id"])

    def _take_events(self, events: list[dict[str, Any]]) -> None:
        horizon_end = self.clock() + self.horizon
        mine = set(self.config.targets)
        windows: list[CongestionLimit] = []
        seen: dict[str, dict[str, Any]] = {}
        rejected: dict[str, str] = {}
        safe_kw: float | None = None
        safe_id: str | None = None
        for event in events:
            event_id = str(event.get("id") or "?")
            if event.get("programID") not in (None, self.program_id):
                continue
            targets = target_values(event.get("targets"))
            if mine and targets and not mine & set(targets):
                continue  # for another site
            try:
                found = event_windows(event, horizon_end=horizon_end)
            except EventRefused as exc:
                rejected[event_id] = str(exc)
                if self.rejected.get(event_id) != str(exc):
                    logger.warning("OpenADR: event %s (%s) refused: %s", event_id,
                                   event.get("eventName") or "unnamed", exc)
                continue
            if is_safe_mode(event):
                imports = [w.import_limit_kw for w in found if w.import_limit_kw is not None]
                if imports:
                    safe_kw, safe_id = min(imports), event_id
                continue
            seen[event_id] = event
            windows += found
        for w in windows:
            if w.import_limit_kw is not None:
                self.lowest_import_kw = min(self.lowest_import_kw or math.inf, w.import_limit_kw)
        self.events, self.rejected = seen, rejected
        self.safe_mode_kw, self.safe_event_id = safe_kw, safe_id
        self.windows = tuple(sorted(windows, key=lambda w: (w.start, w.ref or "")))

    # --- safe mode ---------------------------------------------------------------------------

    def safe_limit_kw(self) -> tuple[float | None, str]:
        if self.safe_mode_kw is not None:
            return self.safe_mode_kw, f"the program's safe-mode event {self.safe_event_id}"
        if self.config.safe_mode_import_limit_kw is not None:
            return self.config.safe_mode_import_limit_kw, "openadr.safe_mode_import_limit_kw"
        if self.lowest_import_kw is not None:
            return self.lowest_import_kw, "the lowest limit the VTN sent"
        return None, "no safe-mode limit known"

    def _enter_safe_mode(self, now: datetime) -> None:
        limit, why = self.safe_limit_kw()
        if self.safe_mode_since is None:
            self.safe_mode_since = now
            logger.error("OpenADR: VTN unreachable for %.0f s (%s): safe mode, import <= %s (%s)",
                         self.config.safe_mode_after_s, self.last_error,
                         "?" if limit is None else f"{limit:g} kW", why)
        if limit is None:
            self._safe_window = None
            return
        window = self._safe_window
        if window is None or window.import_limit_kw != limit or window.end < now + self.horizon:
            start = now.replace(second=0, microsecond=0)
            self._safe_window = CongestionLimit(
                start=start, end=start + 2 * self.horizon, import_limit_kw=limit,
                source="openadr", ref=f"safe-mode:{self.safe_event_id or 'config'}")

    def current_windows(self) -> tuple[CongestionLimit, ...]:
        if self.safe_mode_since is not None and self._safe_window is not None:
            return (*self.windows, self._safe_window)
        return self.windows

    # --- the source --------------------------------------------------------------------------

    def step_done(self, ok: bool) -> SignalUpdate | None:
        """After a poll: safe mode in or out, and the update to publish if the windows changed."""
        now = self.clock()
        self.last_poll = now
        if ok:
            self.last_ok = now
            if self.safe_mode_since is not None:
                logger.warning("OpenADR: the VTN answers again; safe mode ended")
            ended = self.safe_mode_since is not None
            self.unreachable_since = None
            self.safe_mode_since = None
            self._safe_window = None
        else:
            ended = False
            if self.unreachable_since is None:
                self.unreachable_since = self.monotonic()
            if self.monotonic() - self.unreachable_since >= self.config.safe_mode_after_s:
                self._enter_safe_mode(now)
        windows = self.current_windows()
        key = sorted((w.ref or "", w.start, w.end, w.import_limit_kw or -1.0,
                      w.export_limit_kw or -1.0) for w in windows)
        if key == self._published:
            return None
        before = {w.ref for w in windows}
        old_refs = {k[0] for k in self._published or []}
        self._published = key
        self._last_publish = process_clock.now()
        if self.safe_mode_since is not None and self._safe_window is not None:
            reason = (f"OpenADR safe mode: VTN unreachable, import <= "
                      f"{self._safe_window.import_limit_kw:g} kW")
        elif ended:
            reason = "OpenADR: the VTN answers again, safe mode ended"
        else:
            added = sorted(r for r in before - old_refs if r)
            gone = sorted(r for r in old_refs - before if r)
            parts = [f"event {r}: " + ", ".join(
                f"{describe_limit(w)} {w.start:%H:%M}-{w.end:%H:%M} UTC" for w in windows
                if w.ref == r) for r in added]
            parts += [f"event {r} was deleted" for r in gone]
            parts = parts or ["events changed"]
            reason = "OpenADR " + "; ".join(parts)
        return SignalUpdate(source=self.name, reason=reason, congestion=windows)

    async def run(self, publish: Publish) -> None:
        while True:
            try:
                await self.poll()
                ok = True
                if self.last_error is not None:
                    logger.info("OpenADR: VTN %s answers again", self.base)
                self.last_error = None
            except VtnError as exc:
                ok = False
                if self.last_error != str(exc):
                    logger.warning("OpenADR: %s", exc)
                self.last_error = str(exc)
            except Exception as exc:  # an answer we cannot read: like an unreachable VTN
                ok = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("OpenADR: poll failed")
            update = self.step_done(ok)
            if update is not None:
                publish(update)
            await self.save_state()
            await asyncio.sleep(self.config.poll_interval_s)

    async def save_state(self) -> None:
        if self.store is None:
            return
        state = self.state()
        with contextlib.suppress(Exception):
            await self.store.save_signal_state(state.name, state.kind, state.ok, state.detail,
                                               state.last_update, state.extra)

    def state(self) -> SourceState:
        windows = self.current_windows()
        if self.safe_mode_since is not None:
            limit, why = self.safe_limit_kw()
            detail = (f"SAFE MODE since {self.safe_mode_since:%Y-%m-%d %H:%M:%S} UTC: import <= "
                      f"{'?' if limit is None else f'{limit:g} kW'} ({why}); "
                      f"VTN: {self.last_error}")
        elif self.last_error is not None:
            detail = f"VTN not answering ({self.last_error}); last known limits still hold"
        elif self.last_ok is None:
            detail = "not polled yet"
        else:
            detail = f"{len(self.events)} event(s) in force, {len(windows)} window(s)"
        if self.rejected:
            detail += f"; {len(self.rejected)} event(s) refused"
        return SourceState(
            name=self.name, kind="congestion",
            ok=self.last_error is None and self.last_ok is not None and not self.rejected,
            detail=detail, last_update=self._last_publish,
            extra={
                "vtn_url": self.base, "version": self.config.version,
                "ven_name": self.config.ven_name, "ven_id": self.ven_id,
                "program": self.config.program, "program_id": self.program_id,
                "last_poll": self.last_poll, "last_ok": self.last_ok,
                "last_error": self.last_error,
                "safe_mode": self.safe_mode_since is not None,
                "safe_mode_since": self.safe_mode_since,
                "safe_mode_limit_kw": self.safe_limit_kw()[0],
                "safe_mode_limit_from": self.safe_limit_kw()[1],
                "events": [{"id": i, "name": e.get("eventName")} for i, e in self.events.items()],
                "rejected": dict(self.rejected),
                "windows": [window_dict(w) for w in windows],
            })


def window_dict(w: CongestionLimit) -> dict[str, Any]:
    """A window as JSON-friendly data (what `cem congestion list --json` prints)."""
    return {"start": w.start.astimezone(UTC).isoformat(), "end": w.end.astimezone(UTC).isoformat(),
            "import_limit_kw": w.import_limit_kw, "export_limit_kw": w.export_limit_kw,
            "source": w.source, "ref": w.ref}
